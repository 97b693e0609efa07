"""The pure parts of examples/sentiment.py: prompts, pair rows, win rate, KL, masks, log-probs."""

from __future__ import annotations

import math
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
