"""RCPOTrainer and examples/train_rcpo.py: a JSONL of ranked rows to a trained, saved model."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_rcpo  # noqa: E402
from datasets import load_dataset  # noqa: E402
from ranked import response_stats, tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments  # noqa: E402

from rcpo_losses import (  # noqa: E402
    IGNORE,
    UNRANKED,
    all_pairs,
    entropy_dispersion,
    mallows_rmj_discrete,
    mallows_rmj_pairwise,
    mallows_rmj_topk,
    mnl_discrete,
    mnl_pairwise,
    mnl_topk,
)
from rcpo_losses.demo import kendall_tau as kendall_tau_a  # noqa: E402
from rcpo_losses.training.data import RankedPreferenceCollator  # noqa: E402
from rcpo_losses.training.trainer import LOSSES, RCPOTrainer, kendall_tau, top_bottom_ranks  # noqa: E402

DATA = EXAMPLES / "data" / "ranked.jsonl"
METRICS = ["rewards/kendall_tau", "rewards/top1_accuracy", "rewards/margins", "dispersion/neg_log_phi"]

# Fully ranked rows without ties (so that every loss applies), plain and conversational, |S| = 2..4.
ROWS = [
    {"prompt": "repeat apple two times", "completions": ["apple apple .", "apple .", "river ."], "scores": [2, 1, 0]},
    {"prompt": "repeat stone one times", "completions": ["stone stone .", "stone ."], "scores": [0.5, 1.5]},
    {
        "prompt": [{"role": "user", "content": "repeat cloud three times"}],
        "completions": [[{"role": "assistant", "content": t}] for t in ["cloud .", "cloud cloud cloud .", "green ."]]
        + ["cloud cloud ."],
        "ranking": [1, 3, 0, 2],
    },
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_rcpo.build_tokenizer(load_dataset("json", data_files=str(DATA), split="train"))


def make_trainer(tokenizer, tmp_path, loss="mallows_rmj_topk", model=None, bf16=False, train_dataset=ROWS, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, save_strategy="no",
                             bf16=bf16)  # fmt: skip
    model = tiny_llama(vocab_size=len(tokenizer), seed=0) if model is None else model
    return RCPOTrainer(model, args=args, train_dataset=train_dataset, processing_class=tokenizer, loss=loss,
                       beta=0.5, **kwargs)  # fmt: skip


def perturbed(trainer):
    """Move the policy away from the reference, so that rewards are not all 0."""
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return trainer


def test_example_trains_logs_and_saves(tmp_path):
    trainer = train_rcpo.train(str(DATA), steps=4, batch_size=40, output_dir=str(tmp_path / "out"), lr=1e-2)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) >= 2 and eval_logs
    for log in train_logs:
        assert all(name in log for name in METRICS), log
    assert all(f"eval_{name}" in eval_logs[-1] for name in METRICS)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"], train_logs  # full batch: the loss goes down
    assert train_logs[-1]["rewards/margins"] > 0
    # the eval loop computes the same metrics: on the training rows they agree with the last train log
    seen = trainer.evaluate(trainer.train_dataset)
    assert all(f"eval_{name}" in seen for name in METRICS)
    assert seen["eval_rewards/kendall_tau"] > 0 and seen["eval_rewards/margins"] > 0, seen
    # save and reload like any Trainer: the policy and the tokenizer (with its chat template)
    trainer.save_model(str(tmp_path / "saved"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    for (name, p), q in zip(trainer.model.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    args = TrainingArguments(output_dir=str(tmp_path / "again"), report_to=[], use_cpu=True)
    again = RCPOTrainer(model, args=args, processing_class=tok, train_dataset=ROWS)
    batch = again.data_collator(ROWS)
    torch.testing.assert_close(batch, trainer.data_collator(ROWS), rtol=0, atol=0)


def test_example_cli(tmp_path, capsys):
    train_rcpo.main(["--data", str(DATA), "--steps", "2", "--output-dir", str(tmp_path), "--loss", "mnl_topk"])
    assert "saved to" in capsys.readouterr().out
    assert (tmp_path / "model.safetensors").exists()


def reference_loss(trainer, batch, loss):
    """The loss from examples/ranked.py's statistics of every slot (IGNORE slots included): the spec."""
    policy = response_stats(trainer.model, batch)
    with torch.no_grad():
        ref = response_stats(trainer.ref_model, batch)
    ranks, beta, V = batch["ranks"], trainer.beta, trainer.model.config.vocab_size
    if loss == "dpo_all_pairs":
        pairs = all_pairs(ranks)
        return mnl_topk(policy.logps[pairs.row], ref.logps[pairs.row], pairs.ranks, beta=beta)
    if loss.endswith("pairwise"):
        pair = top_bottom_ranks(ranks)
        rows = torch.arange(len(ranks))
        w, l = ((pair == v).int().argmax(-1) for v in (0, UNRANKED))
        phi = {"neg_log_phi": entropy_dispersion(ref.entropy_sums, ref.lengths, pair, V)} if "mallows" in loss else {}
        fn = mnl_pairwise if loss.startswith("mnl") else mallows_rmj_pairwise
        return fn(
            policy.logps[rows, w], policy.logps[rows, l], ref.logps[rows, w], ref.logps[rows, l], beta=beta, **phi
        )
    phi = {"neg_log_phi": entropy_dispersion(ref.entropy_sums, ref.lengths, ranks, V)} if "mallows" in loss else {}
    fns = {"mnl_topk": mnl_topk, "mnl_discrete": mnl_discrete, "mallows_rmj_topk": mallows_rmj_topk}
    fns["mallows_rmj_discrete"] = mallows_rmj_discrete
    if loss.endswith("discrete"):
        ranks = torch.where(ranks > 0, UNRANKED, ranks)
    return fns[loss](policy.logps, ref.logps, ranks, beta=beta, **phi)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_matches_the_functions(tokenizer, tmp_path, loss):
    trainer = perturbed(make_trainer(tokenizer, tmp_path, loss=loss))
    assert trainer.data_collator.layout == "prefix_shared"  # the default
    batch = RankedPreferenceCollator(tokenizer, layout="padded")(ROWS)
    assert (batch["ranks"] == IGNORE).any()  # padding slots are skipped, and must not matter
    want = reference_loss(trainer, batch, loss)
    got = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    packed = trainer.compute_loss(trainer.model, trainer.data_collator(ROWS))
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-6)
    garbage = {**batch, "input_ids": torch.where((batch["ranks"] == IGNORE)[..., None], 7, batch["input_ids"])}
    torch.testing.assert_close(trainer.compute_loss(trainer.model, garbage), got, rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["mallows_rmj_topk", "mnl_pairwise"])
def test_fused_linear_gives_the_same_loss_and_gradients(tokenizer, tmp_path, loss):
    results = []
    for fused in (False, True):
        trainer = perturbed(make_trainer(tokenizer, tmp_path, loss=loss, fused_linear=fused))
        torch.manual_seed(0)
        value = trainer.compute_loss(trainer.model, trainer.data_collator(ROWS))
        value.backward()
        results.append((value.detach(), {n: p.grad for n, p in trainer.model.named_parameters()}))
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def tiny_gemma2(vocab_size: int, softcap: float):
    """A tiny Gemma-2 whose logits (tens) are far past its soft-cap ``softcap``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=softcap,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def test_fused_linear_applies_gemma2_softcap(tokenizer, tmp_path):
    """The fused path reads the soft-cap from the model (lm_head_spec): same loss and gradients as the logits."""
    results = []
    for fused in (False, True):
        model = tiny_gemma2(len(tokenizer), softcap=5.0)
        trainer = perturbed(make_trainer(tokenizer, tmp_path, loss="mnl_topk", fused_linear=fused, model=model))
        batch = trainer.data_collator(ROWS)
        value = trainer.compute_loss(trainer.model, batch)
        value.backward()
        results.append((value.detach(), {n: p.grad for n, p in trainer.model.named_parameters()}))
        if fused:  # the cap matters here: without it the log-probs are far off
            with torch.no_grad():
                capped = trainer.response_stats(trainer.model, batch).logps
                trainer.model.config.final_logit_softcapping = None
                uncapped = trainer.response_stats(trainer.model, batch).logps
            assert (capped - uncapped).abs().max() > 1.0
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_linear_applies_granites_logits_scaling(tokenizer, tmp_path):
    """Granite divides its logits by config.logits_scaling: the fused trainer gives the same loss as the logits."""
    from transformers import GraniteConfig, GraniteForCausalLM

    values = []
    for fused in (False, True):
        torch.manual_seed(0)
        config = GraniteConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, logits_scaling=8.0,
        )  # fmt: skip
        model = GraniteForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)  # logits of tens: the scaling moves the log-probs by nats
        trainer = perturbed(make_trainer(tokenizer, tmp_path, loss="mnl_topk", fused_linear=fused, model=model))
        values.append(trainer.compute_loss(trainer.model, trainer.data_collator(ROWS)).detach())
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-6)


def test_trl_style_config_fields_are_read(tokenizer, tmp_path):
    @dataclasses.dataclass
    class DPOLikeConfig(TrainingArguments):  # TRL's DPOConfig carries these fields
        beta: float = 0.25
        max_length: int | None = 6
        max_prompt_length: int | None = 4

    args = DPOLikeConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = RCPOTrainer(tiny_llama(vocab_size=len(tokenizer)), args=args, processing_class=tokenizer)
    assert trainer.beta == 0.25 and trainer.loss_fn.beta == 0.25
    padded = copy.copy(trainer.data_collator)
    padded.layout = "padded"
    assert padded(ROWS)["input_ids"].shape[-1] == 6
    assert RCPOTrainer(trainer.model, args=args, processing_class=tokenizer, beta=0.5).beta == 0.5  # explicit wins


def test_bad_arguments(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="loss: expected one of"):
        make_trainer(tokenizer, tmp_path, loss="dpo")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="processing_class"):
        RCPOTrainer(tiny_llama(vocab_size=len(tokenizer)), args=args)
    trainer = make_trainer(tokenizer, tmp_path, loss="mnl_pairwise", k=1)  # top-1 lists have no worst response
    with pytest.raises(ValueError, match=r"ranks\[0\]: a pairwise loss compares the best and the worst"):
        trainer.compute_loss(trainer.model, trainer.data_collator(ROWS))
    model = tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="ref_model: is the policy model itself"):
        RCPOTrainer(model, model, args=args, train_dataset=ROWS, processing_class=tokenizer)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen


def test_top_bottom_and_kendall_tau():
    ranks = torch.tensor([[2, 0, 1, IGNORE], [0, UNRANKED, IGNORE, IGNORE], [1, 0, 2, 3]])
    assert top_bottom_ranks(ranks).tolist() == [
        [UNRANKED, 0, IGNORE, IGNORE],
        [0, UNRANKED, IGNORE, IGNORE],
        [IGNORE, 0, IGNORE, UNRANKED],
    ]
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 4, generator=g)
    rewards[0, 3] = float("nan")  # padding is never read
    order = -torch.where(ranks == UNRANKED, 99, ranks).float()  # higher is better; unranked last
    want = torch.stack([kendall_tau_a(rewards[b, :n], order[b, :n]) for b, n in ((0, 3), (1, 2), (2, 4))])
    torch.testing.assert_close(kendall_tau(rewards, ranks), want.mean())
    # a top-1 list over 3: only the pick's two pairs count
    top1 = torch.tensor([[UNRANKED, 0, UNRANKED]])
    assert kendall_tau(torch.tensor([[1.0, 2.0, 3.0]]), top1).item() == 0.0


def test_resume_from_a_checkpoint_continues_the_same_run(tokenizer, tmp_path):
    def run(resume=None):
        model = tiny_llama(vocab_size=len(tokenizer), seed=0)
        ref_model = tiny_llama(vocab_size=len(tokenizer), seed=0)  # the reference is passed again when resuming
        args = TrainingArguments(str(tmp_path), max_steps=4, save_steps=2, per_device_train_batch_size=1,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, seed=0)  # fmt: skip
        trainer = RCPOTrainer(model, ref_model, args, train_dataset=ROWS, processing_class=tokenizer, beta=0.5)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model

    straight = run()
    resumed = run(str(tmp_path / "checkpoint-2"))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(straight.lm_head.weight, tiny_llama(vocab_size=len(tokenizer), seed=0).lm_head.weight)


@pytest.mark.parametrize("loss", ["dpo_all_pairs", "mnl_topk"])
def test_one_update_does_not_depend_on_the_micro_batch_split(tokenizer, tmp_path, loss):
    """4 rows implying 3, 1, 6 and 3 pairs: batch 4, batch 2 x 2 and batch 1 x 4 accumulated make one update."""
    rows = [*ROWS, ROWS[0]]

    def update(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = tiny_llama(vocab_size=len(tokenizer), seed=0)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = TrainingArguments(
            str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size, learning_rate=1.0,
            gradient_accumulation_steps=accumulation, optim="sgd", lr_scheduler_type="constant",
            report_to=[], use_cpu=True, save_strategy="no", seed=0,
        )  # fmt: skip
        trainer = RCPOTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer, loss=loss, beta=0.5)
        trainer.train()
        return {n: p.detach() - start[n] for n, p in model.named_parameters()}

    whole = update(4, 1)
    assert max(float(d.abs().max()) for d in whole.values()) > 1e-4
    for batch_size, accumulation in ((2, 2), (1, 4)):
        split = update(batch_size, accumulation)
        for name, d in whole.items():
            torch.testing.assert_close(split[name], d, rtol=1e-4, atol=1e-7, msg=f"{batch_size}x{accumulation} {name}")


def test_each_evaluation_reports_its_own_rows_under_its_own_prefix(tokenizer, tmp_path):
    def ours(metrics, prefix):
        return {name: metrics[f"{prefix}_{name}"] for name in METRICS}

    def leaked(metrics, prefix):
        return [k for k in metrics if "/" in k and not k.startswith(f"{prefix}_")]

    trainer = perturbed(make_trainer(tokenizer, tmp_path))
    a, b = ROWS[:2], ROWS[2:]
    alone = trainer.evaluate(a)
    predicted = trainer.predict(b).metrics  # under predict's prefix, and nothing left for the next evaluate()
    assert ours(trainer.evaluate(a), "eval") == ours(alone, "eval")
    assert not leaked(predicted, "test"), predicted
    other = trainer.evaluate(b, metric_key_prefix="test")
    assert not leaked(other, "test"), other
    assert ours(other, "test") == ours(predicted, "test") != ours(alone, "eval")
    both = trainer.evaluate({"a": a, "b": b})  # a dict of eval datasets: each under its own name
    assert ours(both, "eval_a") == ours(alone, "eval") and ours(both, "eval_b") == ours(other, "test")
    assert not [k for k in both if "/" in k and not k.startswith(("eval_a_", "eval_b_"))], both
    logged = [h for h in trainer.state.log_history if "eval_b_loss" in h][-1]
    assert ours(logged, "eval_b") == ours(other, "test") and not leaked(logged, "eval_b"), logged


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
@pytest.mark.parametrize("fused", [False, True])
def test_trains_with_bf16_autocast(tokenizer, tmp_path, monkeypatch, layout, fused):
    """bf16=True: accelerate runs the forward under (CPU) autocast; the first-seen head check runs there too."""
    import rcpo_losses.tokens.lm_head as lm_head

    monkeypatch.setattr(lm_head, "_VERIFIED", set())  # the check must run inside the trainer's wrapped forward
    trainer = make_trainer(tokenizer, tmp_path, fused_linear=fused, layout=layout, bf16=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert hasattr(trainer.model, "_original_forward")  # accelerate did wrap the forward in autocast
    assert bool(lm_head._VERIFIED) == fused
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [
        trainer.state.log_history[-1]["train_loss"]
    ]
    assert all(math.isfinite(x) for x in losses), losses
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before, strict=True))


def test_an_override_of_response_stats_is_used_by_the_precomputed_reference(tokenizer, tmp_path):
    class Tempered(RCPOTrainer):
        def response_stats(self, model, inputs, *, entropy=True):
            stats = super().response_stats(model, inputs, entropy=entropy)
            return stats._replace(logps=stats.logps / 2)  # e.g. temperature 2

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, save_strategy="no")
    trainer = Tempered(tiny_llama(vocab_size=len(tokenizer), seed=0), args=args, train_dataset=ROWS,
                       processing_class=tokenizer, precompute_ref=True)  # fmt: skip
    batch = trainer.data_collator(list(trainer.train_dataset))
    _, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    torch.testing.assert_close(out["rewards"], torch.zeros_like(out["rewards"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss", ["mallows_rmj_topk", "dpo_all_pairs"])
def test_evaluation_reports_means_over_the_rows_whatever_the_batch_size(tokenizer, tmp_path, loss):
    """5 rows in one batch, in batches of 4 + 1 or 2 + 2 + 1: the same metrics, means over the rows (pairs).

    A mean of batch means gave top1_accuracy 0.4 in one batch and 0.625 in batches of 4 and 1.
    """
    from rcpo_losses import ranking_metrics

    rows = [*ROWS, ROWS[0], ROWS[1]]
    torch.manual_seed(0)
    trainer = perturbed(make_trainer(tokenizer, tmp_path, loss=loss))
    batch = trainer.data_collator(rows)
    with torch.no_grad():  # one batch of all 5 rows: the loss is the mean over the rows (dpo_all_pairs: pairs)
        whole, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    found = ranking_metrics(out["rewards"], batch["ranks"])
    want = {"loss": whole, "rewards/top1_accuracy": found["top1_accuracy"], "rewards/margins": found["margin"],
            "rewards/kendall_tau": kendall_tau(out["rewards"], batch["ranks"])}  # fmt: skip
    assert 0 < want["rewards/top1_accuracy"] < 1, want
    each = ranking_metrics(out["rewards"], batch["ranks"], reduction="none")  # each row's values: their mean
    assert each["top1_accuracy"].shape == (5,) and each["top1_accuracy"].mean() == found["top1_accuracy"]
    torch.testing.assert_close(kendall_tau(out["rewards"], batch["ranks"], reduction="none").mean(),
                               want["rewards/kendall_tau"])  # fmt: skip
    seen = []
    for batch_size in (5, 4, 2, 1):
        trainer.args.per_device_eval_batch_size = batch_size
        metrics = trainer.evaluate(rows)
        for name, value in want.items():
            assert metrics[f"eval_{name}"] == pytest.approx(float(value), rel=1e-5, abs=1e-6), (batch_size, name)
        seen.append(metrics["eval_dispersion/neg_log_phi"])
    assert seen == pytest.approx([seen[0]] * 4, rel=1e-6)


def test_collator_options_a_users_data_collator_would_not_apply_are_refused(tokenizer, tmp_path, caplog):
    """k, ties, max_length, max_prompt_length with a user's data_collator: once dropped without a sign."""
    mine = RankedPreferenceCollator(tokenizer, k=None, max_length=12)
    with pytest.raises(
        ValueError, match=r"^k: options of the collator .*data_collator=RankedPreferenceCollator.*k=None"
    ):
        make_trainer(tokenizer, tmp_path, k=2, data_collator=mine)
    with pytest.raises(ValueError, match=r"^max_prompt_length, ties: .*\(max_prompt_length=None, ties='leave_out'\)"):
        make_trainer(tokenizer, tmp_path, ties="prefix", max_prompt_length=4, data_collator=mine)
    with pytest.raises(ValueError, match=r"^max_length: .*data_collator=function.*max_length='\(none\)'"):
        make_trainer(tokenizer, tmp_path, max_length=12, data_collator=lambda rows: mine(rows))
    trainer = make_trainer(tokenizer, tmp_path, max_length=12, k=None, data_collator=mine)  # the same: accepted
    assert trainer.data_collator is mine

    @dataclasses.dataclass
    class DPOLikeConfig(TrainingArguments):  # TRL's DPOConfig always has these fields
        max_length: int | None = 6
        max_prompt_length: int | None = None

    args = DPOLikeConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with caplog.at_level("WARNING", logger="rcpo_losses.training.trainer"):
        RCPOTrainer(tiny_llama(vocab_size=len(tokenizer)), args=args, processing_class=tokenizer, data_collator=mine)
    assert "args.max_length not applied: data_collator=RankedPreferenceCollator" in caplog.text, caplog.text
