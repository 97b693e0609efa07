"""rcpo_losses.training.data: rows of ranked completions -> [B, S, L] tensors and [B, S] ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcpo_losses import IGNORE, UNRANKED
from rcpo_losses.ranks import valid_rows
from rcpo_losses.training.data import RankedPreferenceCollator, row_ranks

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "<", ">", "user", "assistant", "system", "end", "hi", "hello", "hey"]
    words += list("abcdefg12345?!.")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    out.chat_template = CHAT
    return out


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ ranks and ties


@pytest.mark.parametrize(
    ("scores", "k", "want"),
    [
        ([1.0, 3.0, 2.0], None, [2, 0, 1]),
        ([1.0, 3.0, 2.0], 1, [UNRANKED, 0, UNRANKED]),
        ([3.0, 1.0, 1.0], 1, [0, UNRANKED, UNRANKED]),  # a tie below the top-1 list does not matter
        ([5.0, 4.0, 2.0, 2.0], 2, [0, 1, UNRANKED, UNRANKED]),  # nor below the top-2 list
        ([2, 7], None, [1, 0]),  # ints are scores too
    ],
)
def test_scores_to_ranks(scores, k, want):
    row = {"completions": ["x"] * len(scores), "scores": scores}
    assert row_ranks(row, k=k) == want
    assert row_ranks(row, k=k, ties="prefix") == want


@pytest.mark.parametrize(
    ("scores", "k", "prefix"),
    [
        ([3.0, 2.0, 2.0, 1.0], None, [0, UNRANKED, UNRANKED, UNRANKED]),  # 1 and 2 tie for second
        ([2.0, 3.0, 1.0, 2.0], 2, [UNRANKED, 0, UNRANKED, UNRANKED]),  # tie at the boundary of the top-2 list
        ([4.0, 3.0, 1.0, 1.0], None, [0, 1, UNRANKED, UNRANKED]),  # full ranking: the last pair ties
    ],
)
def test_ties_error_or_prefix(scores, k, prefix):
    row = {"completions": ["x"] * len(scores), "scores": scores}
    with pytest.raises(ValueError, match=r"row 7 \(prompt .*\): completions \[.*\] tie"):
        row_ranks(row, k=k, index=7)
    assert row_ranks(row, k=k, ties="prefix") == prefix


def test_prefix_with_a_tied_best_raises():
    row = {"completions": ["x", "y", "z"], "scores": [1.0, 1.0, 0.0]}
    with pytest.raises(
        ValueError, match="row 3 \\(prompt .*\\): the best score 1.0 is shared by completions \\[0, 1\\]"
    ):
        row_ranks(row, ties="prefix", index=3)


@settings(max_examples=40)
@given(
    scores=st.lists(st.integers(0, 3).map(float), min_size=2, max_size=6),
    k=st.one_of(st.none(), st.integers(1, 6)),
    shift=st.integers(0, 5),
)
def test_prefix_never_orders_by_position(scores, k, shift):
    """Every order kept is strict in the scores, and rotating the slots rotates the ranks."""
    row = {"completions": ["x"] * len(scores), "scores": scores}
    try:
        ranks = row_ranks(row, k=k, ties="prefix")
    except ValueError:
        assert scores.count(max(scores)) > 1
        return
    ranked = sorted((r, j) for j, r in enumerate(ranks) if r >= 0)
    assert [r for r, _ in ranked] == list(range(len(ranked))) and 1 <= len(ranked) <= (k or len(scores))
    for (_, a), (_, b) in zip(ranked, ranked[1:], strict=False):
        assert scores[a] > scores[b]
    last = ranked[-1][1]
    assert all(scores[last] > scores[j] for j, r in enumerate(ranks) if r == UNRANKED)
    s = shift % len(scores)
    rotated = {"completions": row["completions"], "scores": scores[s:] + scores[:s]}
    assert row_ranks(rotated, k=k, ties="prefix") == ranks[s:] + ranks[:s]


def test_ranking_rows():
    row = {"completions": ["a", "b", "c", "d"], "ranking": [2, 0]}
    assert row_ranks(row) == [1, UNRANKED, 0, UNRANKED]
    assert row_ranks(row, k=1) == [UNRANKED, UNRANKED, 0, UNRANKED]
    assert row_ranks({**row, "ranking": [3, 2, 1, 0]}) == [3, 2, 1, 0]


def test_numpy_feedback_is_read_like_lists():
    scores = np.array([0.5, 2.0, -1.0, 1.0])
    ranking = np.argsort(-scores)  # numpy int64 indices, best first
    want = row_ranks({"completions": list("abcd"), "scores": scores.tolist()})
    assert row_ranks({"completions": list("abcd"), "ranking": ranking}) == want
    assert row_ranks({"completions": list("abcd"), "ranking": list(ranking[:2].astype(np.int32))}, k=2) == [
        UNRANKED, 0, UNRANKED, 1,
    ]  # fmt: skip
    assert row_ranks({"completions": list("abcd"), "scores": scores}) == want
    assert row_ranks({"completions": list("abcd"), "scores": list(scores.astype(np.float32))}) == want


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"completions": ["a"], "scores": [1.0]}, "at least 2 completions"),
        ({"completions": "ab", "scores": [1.0, 2.0]}, "at least 2 completions"),
        ({"completions": ["a", "b"], "scores": [1.0]}, "1 scores for 2 completions"),
        ({"completions": ["a", "b"], "scores": [1.0, float("nan")]}, "finite"),
        ({"completions": ["a", "b"], "scores": [1.0, float("inf")]}, "finite"),
        ({"completions": ["a", "b"], "ranking": [0, 0]}, "distinct completion indices"),
        ({"completions": ["a", "b"], "ranking": [2]}, "distinct completion indices"),
        ({"completions": ["a", "b"], "ranking": []}, "distinct completion indices"),
        ({"completions": ["a", "b"], "ranking": [-1]}, "distinct completion indices"),
        ({"completions": ["a", "b"], "ranking": [0.0]}, "distinct completion indices"),
        ({"completions": ["a", "b"], "ranking": [np.float64(0.0)]}, "distinct completion indices"),
        ({"completions": ["a", "b"], "ranking": [np.bool_(True)]}, "distinct completion indices"),
        ({"completions": ["a", "b", "c"], "scores": [1, None, 0]}, r"'scores'\[1\] = None is not a number"),
        ({"completions": ["a", "b"], "scores": [1, "high"]}, r"'scores'\[1\] = 'high' is not a number"),
        ({"completions": ["a", "b"], "scores": 1.0}, "'scores' must be a list of numbers, got float"),
        ({"completions": ["a", "b"], "scores": np.float64(1.0)}, "'scores' must be a list of numbers, got float64"),
        ({"completions": ["a", "b"], "scores": "12"}, "'scores' must be a list of numbers, got str"),
        ({"completions": ["a", "b"], "ranking": 1}, "'ranking' must be a list of completion indices, got int"),
        ({"completions": ["a", "b"], "ranking": np.int64(1)}, "'ranking' must be a list of completion indices"),
        ({"completions": ["a", "b"]}, "exactly one of 'scores' and 'ranking'"),
        ({"completions": ["a", "b"], "scores": [1, 2], "ranking": [0]}, "exactly one of"),
    ],
)
def test_bad_rows_name_the_row(tokenizer, row, match):
    good = {"prompt": "hi", "completions": ["a", "b"], "scores": [1.0, 0.0]}
    with pytest.raises(ValueError, match=match) as info:
        RankedPreferenceCollator(tokenizer)([good, {"prompt": "hi", **row}])
    assert "row at position 1 of the batch (prompt 'hi')" in str(info.value)
    with pytest.raises(ValueError, match=match) as info:  # the dataset index, where the caller knows it
        RankedPreferenceCollator(tokenizer)([good, {"prompt": "hi", **row}], indices=[8, 9])
    assert "row 9 (prompt 'hi')" in str(info.value)


def test_bad_settings():
    with pytest.raises(ValueError, match="ties"):
        RankedPreferenceCollator(None, ties="first")
    with pytest.raises(ValueError, match="max_length"):
        RankedPreferenceCollator(None, max_length=0)
    with pytest.raises(ValueError, match="k"):
        row_ranks({"completions": ["a", "b"], "scores": [1, 2]}, k=0)


# ------------------------------------------------------------------ tokenization


def test_collates_plain_rows_of_different_sizes(tokenizer):
    rows = [
        {"prompt": "hi a", "completions": ["b c", "d", "e f g"], "scores": [0.5, 2.0, 1.0]},
        {"prompt": "hello", "completions": ["1 2", "3"], "ranking": [1]},
    ]
    out = RankedPreferenceCollator(tokenizer, k=2)(rows)
    assert out["input_ids"].shape == out["attention_mask"].shape == out["completion_mask"].shape
    B, S, L = out["input_ids"].shape
    assert (B, S) == (2, 3) and L == 2 + 3 + 1  # longest prompt + completion + EOS
    assert out["ranks"].tolist() == [[UNRANKED, 0, 1], [UNRANKED, 0, IGNORE]]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert out["input_ids"][0, 2].tolist() == ids(tokenizer, "hi a e f g") + [eos]
    assert out["input_ids"][0, 1].tolist() == ids(tokenizer, "hi a d") + [eos] + [pad] * 2
    assert out["completion_mask"][0, 1].tolist() == [False, False, True, True, False, False]
    assert out["attention_mask"][0, 1].tolist() == [1, 1, 1, 1, 0, 0]
    # the missing slot holds the prompt alone, attended, with no completion token
    assert out["input_ids"][1, 2, :1].tolist() == ids(tokenizer, "hello")
    assert out["attention_mask"][1, 2].sum() == 1 and not out["completion_mask"][1, 2].any()
    assert valid_rows(out["ranks"]).all()
    assert out["input_ids"].dtype == out["ranks"].dtype == torch.int64 and out["completion_mask"].dtype == torch.bool


def test_conversational_rows_use_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": prompt, "completions": [[{"role": "assistant", "content": "hello !"}], "hey"], "scores": [1, 0]}]
    out = RankedPreferenceCollator(tokenizer)(rows)
    prompt_ids = ids(tokenizer, "<user> hi <end> <assistant> ")
    full = ids(tokenizer, "<user> hi <end> <assistant> hello ! <end> ")
    seq = out["input_ids"][0, 0][out["attention_mask"][0, 0].bool()].tolist()
    assert seq == full
    assert out["input_ids"][0, 0][out["completion_mask"][0, 0]].tolist() == full[len(prompt_ids) :]
    assert out["input_ids"][0, 1][out["completion_mask"][0, 1]].tolist() == ids(tokenizer, "hey <end>")


def test_truncation_keeps_the_completion_start_and_never_cuts_the_prompt(tokenizer):
    row = {"prompt": "a b c", "completions": ["1 2 3 4 5", "d"], "scores": [1, 0]}
    out = RankedPreferenceCollator(tokenizer, max_length=5)([row])
    assert out["input_ids"].shape[-1] == 5
    assert out["input_ids"][0, 0].tolist() == ids(tokenizer, "a b c 1 2")
    assert out["completion_mask"][0, 0].tolist() == [False] * 3 + [True] * 2
    with pytest.raises(
        ValueError, match="row at position 0 of the batch \\(prompt .*\\): the prompt has 3 tokens, max_length = 3"
    ):
        RankedPreferenceCollator(tokenizer, max_length=3)([row])
    out = RankedPreferenceCollator(tokenizer, max_length=3, max_prompt_length=2)([row])  # asked for: keeps the end
    assert out["input_ids"][0, 0].tolist() == ids(tokenizer, "b c 1")


def test_collator_output_feeds_the_losses(tokenizer):
    from rcpo_losses import mallows_rmj_topk, response_token_stats

    rows = [
        {"prompt": "hi", "completions": ["a", "b b", "c"], "scores": [3, 1, 2]},
        {"prompt": "hey", "completions": ["d", "e"], "scores": [0, 1]},
    ]
    batch = RankedPreferenceCollator(tokenizer, k=2)(rows)
    B, S, L = batch["input_ids"].shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B * S, L, len(tokenizer), generator=g, requires_grad=True)
    ids_ = batch["input_ids"].reshape(B * S, L)
    stats = response_token_stats(
        logits, ids_, batch["completion_mask"].reshape(B * S, L), shift_labels=True, num_responses=S
    )
    assert stats.lengths.tolist() == [[2, 3, 2], [2, 2, 0]]  # each completion + EOS; the missing slot is empty
    loss = mallows_rmj_topk(stats.logps, torch.zeros(B, S), batch["ranks"], beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.reshape(B, S, L, -1)[1, 2].abs().sum() == 0
