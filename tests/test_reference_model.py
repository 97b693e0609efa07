"""The reference model at scale: precomputed statistics, the PEFT base, step-0 identity.

The 2-process trainer run is in tests/test_trainer_data_parallel.py.
"""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import LlamaForCausalLM, TrainingArguments  # noqa: E402

from rcpo_losses import IGNORE, UNRANKED, entropy_dispersion, lm_head_spec, precompute_reference_stats  # noqa: E402
from rcpo_losses.training.data import REF_COLUMNS, RankedPreferenceCollator  # noqa: E402
from rcpo_losses.training.trainer import RCPOTrainer  # noqa: E402

from .test_trainer import ROWS, make_trainer, perturbed, tiny_llama, tokenizer  # noqa: E402, F401


def modules() -> dict[int, torch.nn.Module]:
    """Every module alive in the process (``type()``, not ``isinstance``: no lazy deprecated objects touched)."""
    gc.collect()
    return {id(o): o for o in gc.get_objects() if issubclass(type(o), torch.nn.Module)}


def live_models() -> int:
    """How many Llama models exist in the process (the policy, and a reference copy if one was made)."""
    return sum(issubclass(type(o), LlamaForCausalLM) for o in modules().values())


def stats_of(trainer, model, rows):
    with torch.no_grad():
        return trainer.response_stats(model, trainer.data_collator(rows))


@pytest.mark.parametrize("fused", [False, True])
def test_precompute_equals_the_live_reference(tokenizer, tmp_path, fused):  # noqa: F811
    trainer = make_trainer(tokenizer, tmp_path, fused_linear=fused)
    live = stats_of(trainer, trainer.ref_model, ROWS)
    rows = precompute_reference_stats(trainer.ref_model, ROWS, trainer.data_collator, batch_size=2,
                                      fused_linear=fused, progress=False)  # fmt: skip
    assert [len(r["ref_logps"]) for r in rows] == [len(r["completions"]) for r in ROWS]
    assert all(r[key] == q[key] for r, q in zip(rows, ROWS, strict=True) for key in q)  # the rows are kept
    batch = trainer.data_collator(rows)
    assert batch["ref_logps"].shape == batch["ranks"].shape and batch["ref_lengths"].dtype == torch.int64
    pad = batch["ranks"] == IGNORE
    assert pad.any() and not batch["ref_logps"][pad].any() and not batch["ref_lengths"][pad].any()
    torch.testing.assert_close(batch["ref_lengths"], live.lengths, rtol=0, atol=0)
    # other batches (batch_size=2 vs 3) pad to other lengths: equal to fp32 rounding
    torch.testing.assert_close(batch["ref_logps"], live.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["ref_entropy_sums"], live.entropy_sums, rtol=1e-5, atol=1e-5)
    # one batch of all rows: the same forward as the live reference, bitwise
    whole = precompute_reference_stats(trainer.ref_model, ROWS, trainer.data_collator, batch_size=3,
                                       fused_linear=fused, progress=False)  # fmt: skip
    once = trainer.data_collator(whole)
    for name, value in zip(REF_COLUMNS, live, strict=True):
        torch.testing.assert_close(once[name], value, rtol=0, atol=0, msg=name)


def test_dataset_and_jsonl_in_and_out(tokenizer, tmp_path):  # noqa: F811
    trainer = make_trainer(tokenizer, tmp_path)
    as_list = precompute_reference_stats(trainer.ref_model, ROWS[:2], trainer.data_collator, progress=False)
    dataset = datasets.Dataset.from_list(ROWS[:2])
    out = precompute_reference_stats(trainer.ref_model, dataset, trainer.data_collator, progress=False)
    assert isinstance(out, datasets.Dataset) and set(REF_COLUMNS) <= set(out.column_names)
    out.save_to_disk(str(tmp_path / "arrow"))
    loaded = datasets.load_from_disk(str(tmp_path / "arrow"))
    again = precompute_reference_stats(trainer.ref_model, loaded, trainer.data_collator, progress=False)  # recomputed
    assert again.column_names == out.column_names
    for name in REF_COLUMNS:
        assert loaded[name] == [r[name] for r in as_list] == again[name], name
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    rows = precompute_reference_stats(trainer.ref_model, path, trainer.data_collator, output=tmp_path / "out.jsonl",
                                      progress=False)  # fmt: skip
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == written and [r["ref_logps"] for r in written] == [r["ref_logps"] for r in as_list]
    with pytest.raises(ValueError, match="batch_size"):
        precompute_reference_stats(trainer.ref_model, ROWS, trainer.data_collator, batch_size=0)


def test_stale_statistics_name_the_row(tokenizer, tmp_path):  # noqa: F811
    trainer = make_trainer(tokenizer, tmp_path)
    rows = precompute_reference_stats(trainer.ref_model, ROWS, trainer.data_collator, progress=False)
    collate = trainer.data_collator
    longer = [rows[0], {**rows[1], "completions": ["stone stone stone .", "stone ."]}]
    with pytest.raises(
        ValueError,
        match=r"row at position 1 of the batch \(prompt 'repeat stone one times'\).*stale.*\[4, 3\].*\[5, 3\]",
    ):
        collate(longer)
    more = [rows[0], {**rows[1], "completions": [*rows[1]["completions"], "x ."], "scores": [0.5, 1.5, 0.0]}]
    with pytest.raises(ValueError, match="position 1 .*stale"):
        collate(more)
    with pytest.raises(ValueError, match="position 0 .*stale"):  # retokenized shorter: max_length changed
        type(collate)(tokenizer, max_length=7)(rows[:2])
    bare = {k: v for k, v in rows[2].items() if k not in REF_COLUMNS}
    with pytest.raises(
        ValueError,
        match=r"position 1 of the batch \(prompt .*\): has no \['ref_logps', 'ref_entropy_sums', 'ref_lengths'\]",
    ):
        collate([rows[0], bare])
    unfingerprinted = {k: v for k, v in rows[1].items() if k != "ref_token_hash"}
    with pytest.raises(ValueError, match="position 0 .*no ref_token_hash.*rerun precompute_reference_stats"):
        collate([unfingerprinted])
    same_lengths = {**rows[1], "completions": ["apple apple .", "river ."]}  # other text, same lengths
    with pytest.raises(ValueError, match="position 0 .*computed on other tokens"):
        collate([same_lengths])


@pytest.mark.parametrize("fused", [False, True])
def test_precompute_ref_trains_with_no_reference_model(tokenizer, tmp_path, fused):  # noqa: F811
    def run(**kwargs):
        model = tiny_llama(vocab_size=len(tokenizer), seed=0)
        args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=3, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                                 disable_tqdm=True)  # fmt: skip
        trainer = RCPOTrainer(model, args=args, train_dataset=ROWS, eval_dataset=ROWS[:2],
                              processing_class=tokenizer, beta=0.5, fused_linear=fused, **kwargs)  # fmt: skip
        return trainer

    before, old = live_models(), set(modules())
    trainer = run(precompute_ref=True)
    assert trainer.ref_model is None and live_models() == before + 1  # the policy alone: no reference copy
    new = [m for key, m in modules().items() if key not in old]
    held = {id(p) for m in new for p in m.parameters()}
    assert held == {id(p) for p in trainer.model.parameters()}  # no reference parameters anywhere in the process
    assert all(set(REF_COLUMNS) <= set(r) for r in trainer.train_dataset)
    assert all(set(REF_COLUMNS) <= set(r) for r in trainer.eval_dataset)
    lm_head_spec(trainer.model)  # the first-seen check of the head (one small forward) happens here, not in a step
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    trainer.train()
    assert len(forwards) == 3  # one forward a step: the policy's; no reference forward
    live = run()  # the same run against a live copy of the reference
    live.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (trainer, live)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(trainer.model.named_parameters(), live.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    evals = [t.evaluate()["eval_loss"] for t in (trainer, live)]  # the eval rows were precomputed too
    torch.testing.assert_close(evals[0], evals[1], rtol=1e-5, atol=1e-6)
    # rows that already carry the columns: no reference model either
    del live
    before = live_models()
    again = run_with_rows = RCPOTrainer(tiny_llama(vocab_size=len(tokenizer)), args=trainer.args,
                                        train_dataset=trainer.train_dataset, processing_class=tokenizer)  # fmt: skip
    assert run_with_rows.ref_model is None and live_models() == before + 1
    bare = trainer.data_collator(ROWS)  # a batch without the columns cannot be scored
    with pytest.raises(ValueError, match="no precomputed ref_logps"):
        again.compute_loss(again.model, bare)


def peft_llama(vocab_size, target_modules, modules_to_save=None):
    """A tiny Llama with a LoRA adapter whose B is random (PEFT initialises it to 0, which would hide a bug)."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(vocab_size=vocab_size, seed=0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, modules_to_save=modules_to_save)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_peft_reference_is_the_base_with_adapters_disabled(tokenizer, tmp_path, fused, modules_to_save):  # noqa: F811
    model = peft_llama(len(tokenizer), ["q_proj", "v_proj"], modules_to_save)
    base = tiny_llama(vocab_size=len(tokenizer), seed=0).eval()  # the same initial weights, no adapter
    before = live_models()
    trainer = make_trainer(tokenizer, tmp_path, model=model, fused_linear=fused, layout="padded")
    assert trainer.ref_model is None and trainer.peft_reference and live_models() == before  # no copy
    batch = trainer.data_collator(ROWS)
    packed = make_trainer(tokenizer, tmp_path, model=model, fused_linear=fused, layout="prefix_shared")
    assert packed.data_collator.layout == "prefix_shared"  # PeftModel takes position_ids in **kwargs: not refused
    with torch.no_grad():  # the PEFT base as reference on the prefix-shared layout: the same numbers
        for got, want in zip(
            packed.reference_stats(model, packed.data_collator(ROWS)),
            trainer.reference_stats(model, batch),
            strict=True,
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = trainer.reference_stats(trainer.model, batch)
        want_ref = trainer.response_stats(base, batch)
        policy = trainer.response_stats(trainer.model, batch)
        B, S, L = batch["input_ids"].shape
        ids = batch["input_ids"].reshape(B * S, L)
        logits = trainer.model(input_ids=ids, attention_mask=batch["attention_mask"].reshape(B * S, L)).logits
    for got, want in zip(ref, want_ref, strict=True):  # the reference is the base model
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from rcpo_losses import response_token_stats

    own = response_token_stats(logits, ids, batch["completion_mask"].reshape(B * S, L), shift_labels=True)
    keep = batch["ranks"] != IGNORE
    torch.testing.assert_close(policy.logps[keep], own.logps.reshape(B, S)[keep], rtol=1e-5, atol=1e-5)  # model(...)
    assert (policy.logps - ref.logps)[keep].abs().min() > 1e-3  # the adapters do change the policy
    value = trainer.compute_loss(trainer.model, batch)
    value.backward()
    assert all(p.grad is not None for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in trainer.model.named_parameters() if not p.requires_grad)


def test_lora_on_the_lm_head_is_refused_by_the_fused_path(tokenizer, tmp_path):  # noqa: F811
    from rcpo_losses import lm_head_spec

    model = peft_llama(len(tokenizer), ["q_proj", "lm_head"])
    with pytest.raises(TypeError, match=r"LoRA adapter\(s\) \['default'\].*W x \+ B A x \* scaling"):
        lm_head_spec(model)
    trainer = make_trainer(tokenizer, tmp_path, model=model, fused_linear=True)
    batch = trainer.data_collator(ROWS)
    with pytest.raises(TypeError, match="LoRA"):
        trainer.compute_loss(trainer.model, batch)
    with torch.no_grad(), model.disable_adapter():  # the reference: the base head, which is then right
        assert lm_head_spec(model).weight is model.get_output_embeddings().base_layer.weight
        ref = trainer.reference_stats(trainer.model, batch)
    base = tiny_llama(vocab_size=len(tokenizer), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(ref.logps, trainer.response_stats(base, batch).logps, rtol=1e-5, atol=1e-5)
    unfused = make_trainer(tokenizer, tmp_path, model=model)  # from the logits the LoRA head is exact
    unfused.compute_loss(unfused.model, batch).backward()
    assert model.get_output_embeddings().lora_B["default"].weight.grad.abs().max() > 0
    merged = model.merge_and_unload()  # merged: W holds the low-rank term, the fused path is right again
    with torch.no_grad():
        fused = make_trainer(tokenizer, tmp_path, model=merged, fused_linear=True).response_stats(merged, batch)
        torch.testing.assert_close(fused.logps, unfused.response_stats(merged, batch).logps, rtol=1e-5, atol=1e-5)


# Trainer arguments of each batch layout; a layout is one more entry here.
LAYOUTS = {"padded": {"layout": "padded"}, "prefix_shared": {"layout": "prefix_shared"}}


def closed_form_at_zero(loss: str, ranks: torch.Tensor, neg_log_phi: torch.Tensor) -> float:
    """The loss at r = 0, from the list lengths alone (mean over rows).

    MNL-Top-k: ``sum_{i=1..k} log |R_i|`` with ``|R_i| = n - i + 1``; Mallows-RMJ-Top-k (sigma(0) = 1/2):
    ``w * (sum_{i=1..k-1} (n - i) / 2 + |U| / 2)`` with ``|U| = n - k``.
    """
    values = []
    for b, row in enumerate(ranks.tolist()):
        n = sum(v != IGNORE for v in row)
        k = sum(v >= 0 for v in row)
        assert n - k == sum(v == UNRANKED for v in row)
        if loss == "mnl_topk":
            values.append(sum(math.log(n - i) for i in range(k)))
        else:
            values.append(float(neg_log_phi[b]) * (sum((n - i) / 2 for i in range(1, k)) + (n - k) / 2))
    return sum(values) / len(values)


def check_step_zero(loss_name, loss, rewards, ranks, neg_log_phi, exact=True):
    """Every reward exactly 0, and the loss its closed form at r = 0.

    ``exact=False`` for precomputed statistics: they come from other batches (other padding and
    matrix shapes), so they agree with the policy's to fp32 rounding, not by construction bitwise.
    """
    if exact:
        assert torch.equal(rewards, torch.zeros_like(rewards)), rewards  # bitwise: policy and reference agree
    else:
        torch.testing.assert_close(rewards, torch.zeros_like(rewards), rtol=0, atol=1e-6)
    want = closed_form_at_zero(loss_name, ranks, neg_log_phi)
    assert want > 0
    torch.testing.assert_close(loss.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("loss", ["mnl_topk", "mallows_rmj_topk"])
def test_step_zero_rewards_are_exactly_zero(tokenizer, tmp_path, layout, fused, loss):  # noqa: F811
    trainer = make_trainer(tokenizer, tmp_path, loss=loss, fused_linear=fused, k=2, **LAYOUTS[layout])
    batch = trainer.data_collator(ROWS)
    assert (batch["ranks"] == UNRANKED).any()  # |U| > 0 somewhere
    trainer.model.train()
    value, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    with torch.no_grad():
        ref = trainer.reference_stats(trainer.model, batch)
    neg_log_phi = entropy_dispersion(ref.entropy_sums, ref.lengths, batch["ranks"], trainer.vocab_size)
    check_step_zero(loss, value.detach(), out["rewards"], batch["ranks"], neg_log_phi)


def test_peft_precompute_is_the_base(tokenizer, tmp_path):  # noqa: F811
    model = peft_llama(len(tokenizer), ["q_proj", "v_proj"])
    base = tiny_llama(vocab_size=len(tokenizer), seed=0).eval()
    trainer = make_trainer(tokenizer, tmp_path, model=model, fused_linear=True, precompute_ref=True)
    assert trainer.ref_model is None
    batch = trainer.data_collator(list(trainer.train_dataset))
    with torch.no_grad():
        want = trainer.response_stats(base, batch)
    for name, value in zip(REF_COLUMNS, want, strict=True):
        torch.testing.assert_close(batch[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert all(not m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))  # adapters back on


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_peft_reference_runs_in_eval_mode(tokenizer, tmp_path, layout):  # noqa: F811
    """With dropout in the base model, the PEFT reference is still the base in eval mode: the same every call."""
    model = peft_llama(len(tokenizer), ["q_proj", "v_proj"])
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    base = tiny_llama(vocab_size=len(tokenizer), seed=0).eval()
    trainer = make_trainer(tokenizer, tmp_path, model=model, **LAYOUTS[layout])
    batch = trainer.data_collator(ROWS)
    model.train()
    model.base_model.model.model.layers[0].eval()  # a mixed train/eval state, restored as it was
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        want = trainer.response_stats(base, batch)
        for _ in range(2):
            got = trainer.reference_stats(model, batch)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [m.training for m in model.modules()] == modes


def test_precompute_errors_name_the_dataset_row(tokenizer, tmp_path):  # noqa: F811
    trainer = make_trainer(tokenizer, tmp_path)
    rows = [dict(ROWS[i % 2]) for i in range(12)]
    rows[9] = {**rows[9], "prompt": "a tied row " + "x " * 30, "scores": [1.0, 1.0]}
    with pytest.raises(ValueError, match=r"^row 9 \(prompt 'a tied row x x x x x x x x x x x x x x x\.\.\.'\): .*tie"):
        precompute_reference_stats(trainer.ref_model, rows, trainer.data_collator, batch_size=4, progress=False)
    conversational = {**ROWS[2], "ranking": [5]}
    with pytest.raises(ValueError, match=r"^row 2 \(prompt 'repeat cloud three times'\): 'ranking'"):
        precompute_reference_stats(trainer.ref_model, [*ROWS[:2], conversational], trainer.data_collator)


def test_statistics_are_tied_to_the_tokens_they_were_computed_on(tokenizer, tmp_path):  # noqa: F811
    """Same completions and lengths, other prompt tokens (max_prompt_length, an edited prompt): the row is named."""
    trainer = make_trainer(tokenizer, tmp_path)
    rows = precompute_reference_stats(trainer.ref_model, ROWS, trainer.data_collator, progress=False)
    assert trainer.data_collator(rows)["ref_logps"].shape == (3, 4)  # the rows they were computed on
    truncating = RankedPreferenceCollator(tokenizer, max_prompt_length=3)
    with pytest.raises(ValueError, match=r"position 0 .*'repeat apple two times'.*computed on other tokens"):
        truncating(rows)
    edited = {**rows[1], "prompt": "repeat stone two times"}
    with pytest.raises(ValueError, match=r"position 1 .*'repeat stone two times'.*computed on other tokens"):
        trainer.data_collator([rows[0], edited])
    later = make_trainer(tokenizer, tmp_path, train_dataset=rows, max_prompt_length=3)  # e.g. from a DPOConfig
    with pytest.raises(ValueError, match="computed on other tokens"):
        later.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stored_statistics_are_not_rounded(tokenizer, tmp_path, dtype):  # noqa: F811
    """fp32 numbers for an fp32 model, fp64 for an fp64 one: the collated columns equal the live statistics."""
    trainer = make_trainer(tokenizer, tmp_path, model=tiny_llama(vocab_size=len(tokenizer), seed=0).to(dtype))
    rows = precompute_reference_stats(trainer.ref_model, ROWS, trainer.data_collator, batch_size=3, progress=False)
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        live = trainer.response_stats(trainer.ref_model, batch)
    for name, value in zip(REF_COLUMNS, live, strict=True):
        assert batch[name].dtype == value.dtype, name
        assert torch.equal(batch[name], value), name


@pytest.mark.parametrize("kind", ["LoHa", "IA3"])
def test_any_adapter_on_the_lm_head_is_refused_by_name(tokenizer, tmp_path, kind):  # noqa: F811
    """Not LoRA only: after the head passed with its adapters off (the precomputed PEFT reference), still refused."""
    import rcpo_losses.tokens.lm_head as lm_head

    peft = pytest.importorskip("peft")
    if kind == "LoHa":
        config = peft.LoHaConfig(r=4, target_modules=["q_proj", "lm_head"], init_weights=False)
    else:
        config = peft.IA3Config(target_modules=["q_proj", "lm_head"], feedforward_modules=[], init_ia3_weights=False)
    model = peft.get_peft_model(tiny_llama(vocab_size=len(tokenizer), seed=0), config)
    trainer = make_trainer(tokenizer, tmp_path, model=model, fused_linear=True, precompute_ref=True)
    head = model.get_output_embeddings()
    with model.disable_adapter():
        off = lm_head._fingerprint(lm_head.unwrap_model(model))
    assert off in lm_head._VERIFIED and lm_head._fingerprint(lm_head.unwrap_model(model)) != off
    batch = trainer.data_collator(list(trainer.train_dataset))
    with pytest.raises(TypeError, match=rf"unmerged {kind} adapter\(s\) \['default'\].*fused_linear=False"):
        trainer.compute_loss(trainer.model, batch)
    unfused = make_trainer(tokenizer, tmp_path, model=model)  # from the logits the adapter is exact, and trained
    unfused.compute_loss(unfused.model, batch).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in head.named_parameters() if "default" in n)


@pytest.mark.parametrize("fused", [False, True])
def test_precompute_runs_under_the_autocast_of_training(tokenizer, tmp_path, fused):  # noqa: F811
    """bf16=True: the precomputed reference is the policy as the steps run it, so the step-0 rewards are 0."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, save_strategy="no",
                             bf16=True, learning_rate=0.0, disable_tqdm=True)  # fmt: skip
    model = tiny_llama(vocab_size=len(tokenizer), seed=0)
    trainer = RCPOTrainer(model, args=args, train_dataset=ROWS, processing_class=tokenizer, fused_linear=fused,
                          layout="padded", precompute_ref=True)  # fmt: skip
    assert "forward" not in vars(trainer.model)  # the training wrapper was taken off again
    rewards = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, out = compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        rewards.append(out["rewards"])
        return loss

    trainer.compute_loss = spy
    trainer.train()
    assert hasattr(trainer.model, "_original_forward") and len(rewards) == 1  # the step ran under autocast
    assert torch.equal(rewards[0], torch.zeros_like(rewards[0])), rewards  # other row order, same numbers


# Plain prompts only: a datasets.Dataset holds one type per column.
PLAIN = [*ROWS[:2], {"prompt": "repeat river two times", "completions": ["river river .", "river ."], "scores": [1, 0]}]


def fresh_trainer(tokenizer, tmp_path, rows, **kwargs):  # noqa: F811
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=3, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)  # fmt: skip
    return RCPOTrainer(tiny_llama(vocab_size=len(tokenizer), seed=0), args=args, train_dataset=rows,
                       processing_class=tokenizer, beta=0.5, **kwargs)  # fmt: skip


@pytest.mark.parametrize("as_dataset", [False, True])
@pytest.mark.parametrize("precompute_ref", [False, True])
def test_rows_without_statistics_beside_precomputed_ones_are_computed(tokenizer, tmp_path, as_dataset, precompute_ref):  # noqa: F811
    """Precomputed rows, then a new one: its statistics are computed, the others kept (no reference either way).

    The first row's statistics once made the trainer skip the dataset: no reference, and the new row's batch failed.
    """
    from rcpo_losses.training.precompute import has_reference_stats, rows_without_reference_stats

    trainer = make_trainer(tokenizer, tmp_path)
    done = precompute_reference_stats(trainer.ref_model, PLAIN[:2], trainer.data_collator, progress=False)
    done[0] = {**done[0], "ref_logps": [x - 0.5 for x in done[0]["ref_logps"]]}  # kept, not recomputed
    rows = [*done, PLAIN[2]]
    if as_dataset:
        rows = datasets.Dataset.from_list(rows)  # the new row holds None in the ref_* columns
    assert rows_without_reference_stats(rows) == [2] and not has_reference_stats(rows)
    new = fresh_trainer(tokenizer, tmp_path, rows, precompute_ref=precompute_ref)
    assert new.ref_model is None and has_reference_stats(new.train_dataset)
    got = list(new.train_dataset)
    assert [r["ref_logps"] for r in got[:2]] == [r["ref_logps"] for r in done]
    alone = precompute_reference_stats(trainer.ref_model, PLAIN[2:], trainer.data_collator, progress=False)[0]
    for name in REF_COLUMNS:
        torch.testing.assert_close(torch.tensor(got[2][name]), torch.tensor(alone[name]), rtol=1e-6, atol=1e-6)
    new.train()  # one batch of all three rows


def test_precomputed_rows_in_a_dict_of_eval_datasets_need_no_reference(tokenizer, tmp_path):  # noqa: F811
    from rcpo_losses.training.precompute import has_reference_stats

    trainer = make_trainer(tokenizer, tmp_path)
    rows = precompute_reference_stats(trainer.ref_model, PLAIN, trainer.data_collator, progress=False)
    assert has_reference_stats({"a": rows[:2], "b": rows[2:]}) and not has_reference_stats({"a": rows, "b": PLAIN})
    del trainer
    before = live_models()
    new = fresh_trainer(tokenizer, tmp_path, rows, eval_dataset={"a": rows[:2], "b": rows[2:]})
    assert new.ref_model is None and live_models() == before + 1  # no reference copy
    metrics = new.evaluate()
    assert "eval_a_loss" in metrics and "eval_b_loss" in metrics
    # with precompute_ref, the eval dataset that lacks them gets them
    new = fresh_trainer(tokenizer, tmp_path, rows, eval_dataset={"a": rows, "b": PLAIN}, precompute_ref=True)
    assert new.ref_model is None and all(set(REF_COLUMNS) <= set(r) for r in new.eval_dataset["b"])


def test_precompute_ref_needs_a_map_style_dataset(tokenizer, tmp_path):  # noqa: F811
    stream = datasets.Dataset.from_list(PLAIN).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"train_dataset: precompute_ref=True .*map-style .*IterableDataset"):
        fresh_trainer(tokenizer, tmp_path, stream, precompute_ref=True)
    with pytest.raises(ValueError, match=r"eval_dataset\['s'\]: precompute_ref=True .*map-style"):
        fresh_trainer(tokenizer, tmp_path, PLAIN, eval_dataset={"s": stream}, precompute_ref=True)
    assert fresh_trainer(tokenizer, tmp_path, stream).ref_model is not None  # a live reference
    trainer = make_trainer(tokenizer, tmp_path)
    table = precompute_reference_stats(trainer.ref_model, datasets.Dataset.from_list(PLAIN), trainer.data_collator,
                                       progress=False)  # fmt: skip
    streamed = fresh_trainer(tokenizer, tmp_path, table.to_iterable_dataset(), precompute_ref=True)
    assert streamed.ref_model is None  # a stream that carries the columns: nothing to compute
    streamed.train()
