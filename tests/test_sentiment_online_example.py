"""The pure parts of examples/sentiment_online.py: the fixed-row Kendall tau and the summary over seeds."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import sentiment_online as so  # noqa: E402


@given(st.lists(st.integers(-50, 50), min_size=2, max_size=7, unique=True), st.data())
@example([0, 1], None)
def test_pair_tau_is_the_trainers_kendall_tau_of_the_reward_ranking(rewards, data):
    """Untied rewards: the same value as the trainer's Kendall tau, which reads the ranking as a top-k list."""
    import torch

    from rcpo_losses.training.trainer import kendall_tau

    n = len(rewards)
    implicit = [0.0] * n if data is None else data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    order = sorted(range(n), key=lambda j: -rewards[j])
    ranks = torch.empty(1, n, dtype=torch.long)
    ranks[0, order] = torch.arange(n)
    expected = kendall_tau(torch.tensor([implicit], dtype=torch.float64), ranks)
    assert so.pair_tau([float(z) for z in implicit], [float(r) for r in rewards]) == pytest.approx(float(expected))


def test_pair_tau_leaves_out_tied_rewards_and_counts_tied_implicit_rewards_zero():
    # pairs with distinct rewards: (1,0) r 1>0, z 2>1: +1; (2,0) r 1>0, z 2=2... listed by hand below
    rewards, implicit = [0.0, 1.0, 1.0, 0.5], [1.0, 2.0, 1.0, 3.0]
    # untied pairs: (1,0): r+ z+ -> +1; (2,0): r+ z= -> 0; (3,0): r+ z+ -> +1; (3,1): r- z+ -> -1; (3,2): r- z+ -> -1
    assert so.pair_tau(implicit, rewards) == pytest.approx((1 + 0 + 1 - 1 - 1) / 5)
    assert so.pair_tau([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) is None  # every reward ties: no pair


def _checkpoint(step, kl, reward, tau, se=0.04):
    return {"step": step, "kl": kl, "reward": reward, "reward_se": se, "tau": tau, "tau_se": se / 2,
            "win_rate": 0.6, "length": 20.0, "cut": 0.5}  # fmt: skip


def test_seed_summary_means_seeds_combines_standard_errors_and_reads_all_runs_at_one_kl():
    runs = [
        {"objective": "dpo", "mode": "offline", "beta": 0.1, "seed": s, "train_s": 60.0,
         "checkpoints": [_checkpoint(6, 1.0, 0.45, 0.1), _checkpoint(12, kl, r, 0.2)]}
        for s, kl, r in ((0, 2.0, 0.50), (1, 3.0, 0.60))
    ] + [
        {"objective": "grpo", "mode": "online", "beta": 0.04, "seed": 0, "train_s": 200.0,
         "logs": [{"frac_reward_zero_std": 0.0}, {"frac_reward_zero_std": 0.5}],
         "checkpoints": [_checkpoint(6, 0.5, 0.40, 0.05), _checkpoint(12, 1.5, 0.55, 0.3)]}
    ]  # fmt: skip
    results = {"base": {"reward": 0.35, "reward_se": 0.03, "kl": 0.0, "length": 20.0, "cut": 0.5},
               "config": {"objectives": ["dpo", "grpo"]}, "runs": runs}  # fmt: skip
    lines = {line["objective"]: line for line in so.seed_summary(results)}
    dpo, grpo = lines["dpo"], lines["grpo"]
    assert dpo["reward"] == pytest.approx(0.55) and dpo["reward_spread"] == pytest.approx(0.05)
    assert dpo["reward_se"] == pytest.approx(math.sqrt(2 * 0.04**2) / 2)  # the SE of a mean of two
    assert grpo["reward_se"] == pytest.approx(0.04) and grpo["skipped_groups"] == pytest.approx(0.25)
    assert dpo["skipped_groups"] is None
    assert dpo["common_kl"] == grpo["common_kl"] == 1.5  # the smallest final KL of all runs, offline and online
    seed0 = 0.45 + 0.05 * 0.5 / 1.0  # between its checkpoints at KL 1 and 2
    seed1 = 0.45 + (0.60 - 0.45) * 0.5 / 2.0
    assert dpo["reward_at_common_kl"] == pytest.approx((seed0 + seed1) / 2)
    assert grpo["reward_at_common_kl"] == pytest.approx(0.55)
    table = so.markdown_table(results)
    assert table.count("\n") == 5 and "| grpo | online | 0.04 | 1 | 0.550 ± 0.040" in table
