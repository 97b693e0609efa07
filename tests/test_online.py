"""OnlineRCPOTrainer: sample, score, rank and train at every step (tiny in-process models and tokenizers)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

from rcpo_losses.training.data import encode_prompt  # noqa: E402
from rcpo_losses.training.generate import hf_generate  # noqa: E402
from rcpo_losses.training.online import OnlineRCPOTrainer, WeightedReward  # noqa: E402

from .test_generate import make_model, make_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["hi a b", "hello", "a b c d e f g", "1 2 3", "g f e", "hey c d e"]
GOOD = {"a", "b", "c", "d", "e", "f", "g"}  # the letters: about half of the words the tiny model samples


def words(completion) -> list[str]:
    text = completion if isinstance(completion, str) else completion[0]["content"]
    return text.split()


def first_is_good(prompts, completions, **kwargs):
    """A 0/1 reward: the completion starts with a letter."""
    return [float(bool(words(c)) and words(c)[0] in GOOD) for c in completions]


def share_good(prompts, completions, **kwargs):
    """A continuous reward: the share of letters among the words (0 for an empty completion)."""
    return [sum(w in GOOD for w in words(c)) / max(len(words(c)), 1) for c in completions]


def mean_reward(model, tokenizer, reward, samples: int = 16, seed: int = 123) -> float:
    """The policy's mean reward: ``samples`` completions of each prompt, sampled as the trainer samples."""
    ids = [encode_prompt(tokenizer, p)[1] for p in PROMPTS]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        groups, _ = hf_generate(
            model.eval(), tokenizer, ids, num_samples=samples, max_new_tokens=4, temperature=1.0, top_p=1.0
        )
    flat = [(p, s.text) for p, group in zip(PROMPTS, groups, strict=True) for s in group]
    return sum(reward([p for p, _ in flat], [c for _, c in flat])) / len(flat)


def make_trainer(tmp_path, reward=first_is_good, steps=4, model=None, **kwargs):
    config = {
        "output_dir": str(tmp_path / "out"),
        "report_to": [],
        "use_cpu": True,
        "max_steps": steps,
        "per_device_train_batch_size": 3,
        "learning_rate": 3e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "max_grad_norm": 0.0,
        **kwargs.pop("args", {}),
    }
    args = transformers.TrainingArguments(**config)
    options = {"num_generations": 4, "max_completion_length": 4, "beta": 0.1, "loss": "mnl_topk", **kwargs}
    return OnlineRCPOTrainer(
        make_model() if model is None else model,
        reward_funcs=reward,
        args=args,
        train_dataset=[{"prompt": p} for p in PROMPTS],
        processing_class=make_tokenizer(),
        **options,
    )


# ------------------------------------------------------------------ it learns


@pytest.mark.parametrize(
    ("reward", "loss"),
    [
        (first_is_good, "mnl_topk"),
        (first_is_good, "mallows_rmj_topk"),
        (share_good, "mnl_topk"),
        (share_good, "mnl_pairwise"),
    ],  # fmt: skip
)
def test_training_raises_the_reward(tmp_path, reward, loss):
    tokenizer = make_tokenizer()
    before = mean_reward(make_model(), tokenizer, reward)
    trainer = make_trainer(tmp_path, reward=reward, loss=loss, steps=12, args={"learning_rate": 0.1})
    trainer.train()
    after = mean_reward(trainer.model, tokenizer, reward)
    assert after > before + 0.3, (before, after)
    logs = [h for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    assert len(logs) == 12
    for name in ("completions/mean_length", "completions/clipped_ratio", "time/sampling", "time/training",
                 "tokens_per_second/sampling"):  # fmt: skip
        assert all(math.isfinite(h[name]) for h in logs), name
    # a step (one micro-batch) with a group that trains: one that ranks, and for a pairwise loss holds a pair
    ranked = [h for h in logs if h["frac_reward_zero_std"] + h.get("frac_no_untied_pair", 0) < 1]
    assert ranked
    for name in ("reward", "reward_std", "kl", "rewards/kendall_tau", f"rewards/{reward.__name__}/mean",
                 "tokens_per_second/training"):  # fmt: skip
        assert all(math.isfinite(h[name]) for h in ranked), name
    assert ranked[-1]["kl"] > 0  # the policy moved away from the reference


def test_a_group_of_equal_rewards_is_skipped_and_nothing_moves(tmp_path):
    def constant(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    trainer = make_trainer(tmp_path, reward=constant, steps=2, args={"weight_decay": 0.0})
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    assert [h["frac_reward_zero_std"] for h in logs] == [1.0, 1.0]
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), start[n], rtol=0, atol=0, msg=n)


def test_partial_ties_of_a_binary_reward_follow_the_collators_rule(tmp_path):
    """0/1 rewards tie constantly: ``ties="leave_out"`` keeps what orders no tie, never an order by position."""
    fixed = {
        "hi a b": ["a", "1", "2", "3"],  # one winner: the top-1 list [0, U, U, U]
        "hello": ["a", "b", "1", "2"],  # two tied winners above tied losers: nothing left to rank
        "a b c d e f g": ["1", "1", "2", "3"],  # all 0 (and two identical): no ranking
    }

    def generate(texts, num_samples, seed):
        return [fixed[t] for t in texts]

    trainer = make_trainer(tmp_path, generate=generate)
    batch, metrics = trainer.sample_and_rank([{"prompt": p} for p in fixed])
    assert trainer.last_ranked.skipped == [None, "tied", "tied"]
    assert batch["ranks"].tolist() == [[0, -1, -1, -1]]
    assert metrics["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert metrics["reward"] == pytest.approx(3 / 12)  # every sample counted, merged or not


def test_a_pairwise_loss_reads_each_groups_best_and_worst_untied_completion(tmp_path):
    """Online DPO with ties: the pair is the best and the worst completion whose reward no other shares."""
    fixed = {
        "hi a b": ["w", "x", "y", "z"],  # rewards 3, 2, 2, 1: the pair is w (3) and z (1)
        "hello": ["w", "x", "y", "x"],  # 3, 2, 2 (x merged): it ranks (w first), but only w stands alone
        "1 2 3": ["v", "w", "x", "z"],  # 1, 3, 2, 1: w (3) and x (2)
    }
    score = {"w": 3.0, "x": 2.0, "y": 2.0, "z": 1.0, "v": 1.0}

    def lookup(prompts, completions, **kwargs):
        return [score[words(c)[0]] for c in completions]

    def generate(texts, num_samples, seed):
        return [fixed[t] for t in texts]

    trainer = make_trainer(tmp_path, reward=lookup, generate=generate, loss="mnl_pairwise")
    collated = []
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: collated.extend(rows) or collate(rows)
    batch, metrics = trainer.sample_and_rank([{"prompt": p} for p in fixed])
    assert [[words(c)[0] for c in row["completions"]] for row in collated] == [["w", "z"], ["w", "x"]]
    assert [row["scores"] for row in collated] == [[3.0, 1.0], [3.0, 2.0]]
    assert batch["ranks"].tolist() == [[0, 1], [0, 1]]
    assert metrics["frac_no_untied_pair"] == pytest.approx(1 / 3)
    assert metrics["frac_reward_zero_std"] == 0.0  # no group ties throughout


def test_weighted_rewards_skip_none_as_trl_does():
    def a(prompts, completions, **kwargs):
        return [1.0, None, 2.0]

    def b(prompts, completions, **kwargs):
        return [10.0, 20.0, None]

    reward = WeightedReward([a, b], [1.0, 0.5])
    assert reward(prompts=["p"] * 3, completions=["x", "y", "z"]) == [6.0, 10.0, 2.0]
    assert reward.names == ["a", "b"]


# ------------------------------------------------------------------ TRL's habits


def test_a_grpo_config_is_read(tmp_path):
    trl = pytest.importorskip("trl")
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=1, num_generations=3,
        per_device_train_batch_size=6, max_completion_length=3, temperature=0.7, top_p=0.9, beta=0.2,
        save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = OnlineRCPOTrainer(make_model(), reward_funcs=[first_is_good, share_good], args=args,
                                train_dataset=[{"prompt": p} for p in PROMPTS], processing_class=make_tokenizer(),
                                reward_weights=None, loss="mnl_topk")  # fmt: skip
    assert (trainer.num_generations, trainer.max_completion_length) == (3, 3)
    assert (trainer.temperature, trainer.top_p, trainer.beta) == (0.7, 0.9, 0.2)
    assert trainer._train_batch_size == 2  # 6 completions = 2 prompts x 3
    trainer.train()
    assert "rewards/share_good/mean" in trainer.state.log_history[0]


def test_bad_input_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        make_trainer(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="beta"):
        make_trainer(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="'completions' column"):
        OnlineRCPOTrainer(make_model(), reward_funcs=first_is_good,
                          args=transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                          train_dataset=[{"prompt": "a", "completions": ["b", "c"], "scores": [1, 0]}],
                          processing_class=make_tokenizer())  # fmt: skip

    def nan_reward(prompts, completions, **kwargs):
        return [math.nan if "hello" in p else 0.0 for p in prompts]

    with pytest.raises((ValueError, RuntimeError), match=r"prompt 1 \('hello'\).*scored nan"):
        make_trainer(tmp_path, reward=nan_reward, steps=2).train()  # one epoch: every prompt

    def short(prompts, completions, **kwargs):
        return [0.0]

    with pytest.raises((ValueError, RuntimeError), match="returned 1 scores"):
        make_trainer(tmp_path, reward=short, steps=1).train()

    def nothing(prompts, completions, **kwargs):
        return [None] * len(completions)

    with pytest.raises((ValueError, RuntimeError), match="every function returned None"):
        make_trainer(tmp_path, reward=nothing, steps=1).train()


# ------------------------------------------------------------------ resume


def train_to(out: str, steps: int, kill_at: int | None = None, resume: bool = False) -> None:
    """Train ``steps`` steps, checkpointing every 2; SIGKILL this process at the end of step ``kill_at``."""

    class Kill(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if kill_at is not None and state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = make_trainer(Path(out), steps=steps, args={"save_strategy": "steps", "save_steps": 2},
                           callbacks=[Kill()])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(str(Path(out) / "final"))


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train_to(str(whole), steps=4)
    code = f"from tests.test_online import train_to; train_to({str(killed)!r}, 4, kill_at=3)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert (killed / "out" / "checkpoint-2").is_dir() and not (killed / "final").exists()
    train_to(str(killed), steps=4, resume=True)
    a = transformers.AutoModelForCausalLM.from_pretrained(whole / "final")
    b = transformers.AutoModelForCausalLM.from_pretrained(killed / "final")
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


# ------------------------------------------------------------------ data parallel


def rank_zero_ties(prompts, completions, **kwargs):
    """Every group of process 0 ties (all of its micro-batches are skipped); process 1 ranks by ``share_good``."""
    return [0.0] * len(completions) if os.environ["RANK"] == "0" else share_good(prompts, completions)


def ddp_worker(rank: int, store: str, out: str, reward_name: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        seen = []

        class Recording(OnlineRCPOTrainer):
            def sample_and_rank(self, rows):
                batch, metrics = super().sample_and_rank(rows)
                groups = [(r["prompt"], sum(r["samples"])) for r in self.last_ranked.rows if r is not None]
                seen.append({"prompts": [r["prompt"] for r in rows], "groups": groups})
                return batch, metrics

        args = transformers.TrainingArguments(output_dir=os.path.dirname(out), report_to=[], use_cpu=True,
                                              max_steps=2, per_device_train_batch_size=2, learning_rate=3e-2,
                                              logging_steps=1, save_strategy="no", seed=0)  # fmt: skip
        reward = {"share_good": share_good, "rank_zero_ties": rank_zero_ties}[reward_name]
        trainer = Recording(make_model(), reward_funcs=reward, args=args, processing_class=make_tokenizer(),
                            train_dataset=[{"prompt": p} for p in PROMPTS[:4]], num_generations=4,
                            max_completion_length=4, beta=0.1, loss="mnl_topk")  # fmt: skip
        trainer.train()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        state = {n: p.detach().clone() for n, p in policy.named_parameters()}
        logs = [h for h in trainer.state.log_history if "frac_reward_zero_std" in h]
        torch.save({"seen": seen, "state": state, "logs": logs, "wrapper": type(trainer.model_wrapped).__name__},
                   f"{out}.{rank}")  # fmt: skip
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.parametrize("reward_name", ["share_good", "rank_zero_ties"])
def test_two_processes_sample_their_own_groups_whole_and_stay_in_sync(tmp_path, reward_name):
    """Each process samples its own prompts' groups whole; the weights stay equal, also when one process
    skips every micro-batch (it still joins the gradient reduction) and the other trains."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "out.pt")
    mp.spawn(ddp_worker, args=(str(tmp_path / "store"), out, reward_name), nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert all(r["wrapper"] == "DistributedDataParallel" for r in results)
    for step in range(2):
        mine = [set(r["seen"][step]["prompts"]) for r in results]
        assert len(mine[0]) == len(mine[1]) == 2 and not mine[0] & mine[1]  # each prompt on one process
        for r, prompts in zip(results, mine, strict=True):  # a process's groups are its own prompts', whole
            assert all(p in prompts and n == 4 for p, n in r["seen"][step]["groups"])
    for name, value in results[0]["state"].items():
        torch.testing.assert_close(results[1]["state"][name], value, rtol=0, atol=0, msg=name)
    assert results[0]["logs"] == results[1]["logs"]  # metrics averaged over both processes
    start = make_model().state_dict()
    assert any(not torch.equal(start[n], v) for n, v in results[0]["state"].items())  # it trained
    if reward_name == "rank_zero_ties":
        assert all(r["seen"][step]["groups"] == [] for r in results[:1] for step in range(2))
        assert all(h["frac_reward_zero_std"] >= 0.5 for h in results[0]["logs"])  # process 0: all of its groups


# ------------------------------------------------------------------ evaluation and PEFT


def test_evaluate_samples_the_eval_prompts(tmp_path):
    trainer = make_trainer(tmp_path, reward=share_good, steps=1)
    metrics = trainer.evaluate([{"prompt": p} for p in PROMPTS[:4]])
    for name in ("reward", "frac_reward_zero_std", "completions/mean_length", "time/sampling"):
        assert math.isfinite(metrics[f"eval_{name}"]), name
    assert metrics["eval_kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference yet


def test_a_peft_policy_is_its_own_reference(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = make_trainer(tmp_path, reward=share_good, steps=2, model=model)
    assert trainer.ref_model is None and trainer.peft_reference
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert logs and logs[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA starts at the base: log pi = log pi_ref
