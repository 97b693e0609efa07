"""The pure parts of examples/sentiment.py: prompts, pair rows, win rate, KL, masks, log-probs."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import sentiment  # noqa: E402


def test_prompts_are_distinct_seeded_and_split_cleanly(monkeypatch):
    prompts = sentiment.make_prompts(120, seed=0)
    assert len(set(prompts)) == 120
    assert prompts == sentiment.make_prompts(120, seed=0)
    assert prompts[:50] == sentiment.make_prompts(50, seed=0)  # a longer list only adds prompts
    assert prompts != sentiment.make_prompts(120, seed=1)
    assert all("review" in p.lower() and '"' in p for p in prompts)
    monkeypatch.setattr(sentiment, "ITEMS", {"film": ("the film", ["Jaws"])})
    assert len(sentiment.make_prompts(len(sentiment.REQUESTS))) == len(sentiment.REQUESTS)
    with pytest.raises(ValueError, match="n:"):
        sentiment.make_prompts(len(sentiment.REQUESTS) + 1)


def test_pair_rows_keep_the_best_and_worst_untied_completions_and_their_ids():
    rows = [
        {"prompt": "p", "completions": list("abcde"), "completion_ids": [[1], [2], [3], [4], [5]],
         "truncated": [False, True, False, True, False], "scores": [0.0, 0.5, 0.0, -0.2, 0.9],
         "samples": [1, 1, 1, 1, 1], "prompt_ids": [7], "prompt_index": 0},
        {"prompt": "q", "completions": list("abc"), "scores": [0.0, 0.0, 0.4], "truncated": [None] * 3},
        {"prompt": "r", "completions": list("abc"), "scores": [0.3, 0.3, -0.4], "truncated": [None] * 3},
    ]  # fmt: skip
    out, dropped = sentiment.pair_rows(rows)
    assert dropped == 2  # q and r: a single untied score
    assert out == [{"prompt": "p", "completions": ["e", "d"], "completion_ids": [[5], [4]], "truncated": [False, True],
                    "scores": [0.9, -0.2], "samples": [1, 1], "prompt_ids": [7], "prompt_index": 0}]  # fmt: skip


def test_a_run_of_another_configuration_in_out_is_refused(tmp_path):
    import json

    cfg = {**sentiment.CONFIGS["quick"], "objectives": ["dpo"]}
    (tmp_path / "results.json").write_text(json.dumps({"config": cfg}))
    with pytest.raises(SystemExit, match=r"holds a run of another configuration \(.*max_new_tokens.*\)"):
        sentiment.main(["--out", str(tmp_path), "--objectives", "dpo"])  # the full configuration on a quick run


def test_win_rate_counts_every_pair_and_ties_as_half():
    assert sentiment.win_rate([[1.0, 0.0]], [[0.5, 0.0]]) == pytest.approx(2.5 / 4)
    assert sentiment.win_rate([[1.0], [0.0]], [[0.0], [1.0]]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="policy"):
        sentiment.win_rate([[1.0]], [[1.0], [0.0]])


rewards = st.lists(
    st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.3, 1.0]), min_size=1, max_size=4), min_size=3, max_size=3
)


@given(rewards, rewards)
def test_win_rate_is_antisymmetric(a, b):
    assert sentiment.win_rate(a, b) + sentiment.win_rate(b, a) == pytest.approx(1.0)
    assert sentiment.win_rate(a, a) == pytest.approx(0.5)


def test_kl_estimate_is_the_mean_log_ratio_with_its_standard_error():
    kl, se = sentiment.kl_estimate([-1.0, -2.0, -3.0], [-2.0, -2.0, -5.0])
    assert kl == pytest.approx(1.0)
    assert se == pytest.approx(1.0 / math.sqrt(3))
    assert sentiment.kl_estimate([-1.0, -4.0], [-1.0, -4.0]) == (0.0, 0.0)


def test_completion_mask_keeps_tokens_through_the_first_eos():
    import torch

    tokens = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 6, 2, 8]])
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert sentiment.completion_mask(tokens, eos=2).int().tolist() == expected


def test_sequence_logps_of_left_padded_rows_equal_each_row_alone():
    import torch
    from ranked import tiny_llama

    model = tiny_llama(vocab_size=11, seed=0).eval()
    prompts, completion = [[3, 4, 5], [6, 7]], [[8, 9, 2], [9, 2, 2]]  # row 1 ends at its first EOS (2)
    n_prompt = 3
    ids = torch.tensor([[3, 4, 5, *completion[0]], [0, 6, 7, *completion[1]]])
    mask = sentiment.completion_mask(torch.tensor(completion), eos=2)
    attention = torch.cat([torch.tensor([[1, 1, 1], [0, 1, 1]]), mask.long()], 1)
    found = sentiment.sequence_logps(model, ids, attention, n_prompt, mask)
    for b in range(2):
        seq = torch.tensor([prompts[b] + completion[b][: int(mask[b].sum())]])
        with torch.no_grad():
            logps = model(seq).logits[0, :-1].log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0]
        assert found[b].item() == pytest.approx(logps[len(prompts[b]) - 1 :].sum().item(), abs=1e-5)


def test_reward_reads_text_and_chat_completions():
    chat = [[{"role": "assistant", "content": "I loved it, wonderful!"}], "It was awful."]
    good, bad = sentiment.reward(["p", "p"], chat)
    assert good > 0.5 and bad < -0.3


def test_interpolate_is_piecewise_linear_inside_the_points_only():
    points = [(2.0, 0.5), (0.0, 0.0), (4.0, 0.6)]
    assert sentiment.interpolate(points, 1.0) == pytest.approx(0.25)
    assert sentiment.interpolate(points, 3.0) == pytest.approx(0.55)
    assert math.isnan(sentiment.interpolate(points, 5.0))


def test_a_rerun_resumes_only_when_just_the_objectives_changed():
    cfg = {**sentiment.CONFIGS["quick"], "objectives": ["dpo"]}
    assert sentiment.same_setup(cfg, {**cfg, "objectives": ["dpo", "mnl_top2"]})
    assert not sentiment.same_setup(cfg, {**cfg, "steps": cfg["steps"] + 1})


def test_gain_per_nat_is_the_least_squares_slope_through_the_origin():
    assert sentiment.gain_per_nat([(1.0, 0.1), (2.0, 0.2)]) == pytest.approx(0.1)
    assert sentiment.gain_per_nat([(1.0, 0.0), (1.0, 0.2)]) == pytest.approx(0.1)


def reviewed_item(prompt: str) -> str:
    """What a prompt asks to review, read from its text: the kind of item and its quoted name."""
    return re.search(r'(the [a-z ]+ "[^"]+")', prompt).group(1)


@pytest.mark.parametrize(("n_train", "n_held_out", "seed"), [(72, 24, 0), (8, 4, 0), (40, 30, 3)])
def test_held_out_prompts_review_no_item_of_the_training_prompts(n_train, n_held_out, seed):
    """Split by item: 3 of the 24 held-out prompts once asked for a training prompt's item in other words."""
    train, held_out = sentiment.split_prompts(n_train, n_held_out, seed=seed)
    assert train == sentiment.make_prompts(n_train, seed=seed)  # the training prompts are those of make_prompts
    assert len(held_out) == n_held_out
    items = [reviewed_item(p) for p in held_out]
    assert len(set(items)) == n_held_out  # each held-out prompt its own item
    assert not [item for item in items if any(item in p for p in train)]
    assert (train, held_out) == sentiment.split_prompts(n_train, n_held_out, seed=seed)


def test_split_prompts_refuses_more_items_than_the_templates_hold(monkeypatch):
    monkeypatch.setattr(sentiment, "ITEMS", {"film": ("the film", ["Jaws", "Alien"])})
    (train,), (held_out,) = sentiment.split_prompts(1, 1)
    assert {reviewed_item(train), reviewed_item(held_out)} == {'the film "Jaws"', 'the film "Alien"'}
    with pytest.raises(ValueError, match="n_held_out:"):
        sentiment.split_prompts(1, 2)


def checkpoints(*points):
    """A run's checkpoints: (step, KL, reward) with the other numbers summary_table reads."""
    keys = {"reward_prefix": 0.0, "win_rate": 0.5, "length": 10.0, "cut": 0.0}
    return [{"step": step, "kl": kl, "reward": reward, **keys} for step, kl, reward in points]


def test_reward_at_common_kl_is_read_at_the_smallest_final_kl():
    """Curves whose KL goes down at the last checkpoint: the common KL is the smallest final KL (1.22), as
    documented, not the smallest largest-checkpoint KL (1.3), past where the first run ended."""
    runs = [
        {"objective": "dpo", "beta": 0.5, "seed": 0, "grad_norms": [1.0],
         "checkpoints": checkpoints((6, 1.5, 0.6), (12, 1.22, 0.65))},
        {"objective": "mnl_top2", "beta": 0.5, "seed": 0, "grad_norms": [1.0],
         "checkpoints": checkpoints((6, 0.9, 0.5), (12, 1.3, 0.7))},
    ]  # fmt: skip
    results = {"base": {"reward": 0.3}, "config": {"objectives": ["dpo", "mnl_top2"]}, "runs": runs}
    assert sentiment.common_kl(runs) == 1.22
    lines = {line["objective"]: line for line in sentiment.summary_table(results)}
    assert lines["dpo"]["common_kl"] == lines["mnl_top2"]["common_kl"] == 1.22
    assert lines["dpo"]["reward_at_common_kl"] == pytest.approx(0.65)  # its final checkpoint
    assert lines["mnl_top2"]["reward_at_common_kl"] == pytest.approx(0.5 + 0.2 * (1.22 - 0.9) / (1.3 - 0.9))
    below = [{**runs[0], "checkpoints": checkpoints((6, 0.2, 0.4), (12, -0.01, 0.3))}, runs[1]]
    assert sentiment.common_kl(below) == 0.0  # a KL estimate below 0 (noise): the base itself
