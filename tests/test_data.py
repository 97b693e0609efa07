"""rcpo_losses.training.data: rows of ranked completions -> [B, S, L] tensors and [B, S] ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcpo_losses import IGNORE, UNRANKED
from rcpo_losses.ranks import valid_rows
from rcpo_losses.training.data import (
    TIES,
    RankedPreferenceCollator,
    best_and_worst,
    encode_prompt,
    has_ranking,
    row_ranks,
    token_hash,
)

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
    for ties in TIES:
        assert row_ranks(row, k=k, ties=ties) == want


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
        row_ranks(row, k=k, ties="error", index=7)
    assert row_ranks(row, k=k, ties="prefix") == prefix
    assert row_ranks(row, k=k) == prefix  # the default, "leave_out", is "prefix" when the best is untied


def test_prefix_with_a_tied_best_raises():
    row = {"completions": ["x", "y", "z"], "scores": [1.0, 1.0, 0.0]}
    with pytest.raises(
        ValueError, match="row 3 \\(prompt .*\\): the best score 1.0 is shared by completions \\[0, 1\\]"
    ):
        row_ranks(row, ties="prefix", index=3)


@pytest.mark.parametrize(
    ("scores", "k", "want"),
    [
        ([3.0, 3.0, 2.0, 1.0], None, [IGNORE, IGNORE, 0, 1]),  # the tied best leave; 2 beats 3
        ([3.0, 3.0, 2.0, 1.0, 0.0], 1, [IGNORE, IGNORE, 0, UNRANKED, UNRANKED]),
        ([2.0, 2.0, 1.0, 0.0, 0.0], None, [IGNORE, IGNORE, 0, UNRANKED, UNRANKED]),  # then a tie ends the list
        ([0.8, 0.0, 0.0, -0.3, 0.0], None, [0, UNRANKED, UNRANKED, UNRANKED, UNRANKED]),  # VADER's zeros
        ([1.0, 5.0, 5.0, 2.0, 2.0, 0.0, 3.0], None, [UNRANKED, IGNORE, IGNORE, UNRANKED, UNRANKED, UNRANKED, 0]),
        ([4.0, 3.0, 1.0, 1.0], None, [0, 1, UNRANKED, UNRANKED]),  # an untied best: as "prefix"
    ],
)
def test_leave_out_keeps_every_row_that_has_a_list(scores, k, want):
    row = {"completions": ["x"] * len(scores), "scores": scores}
    assert row_ranks(row, k=k) == row_ranks(row, k=k, ties="leave_out") == want
    assert has_ranking(scores)


@pytest.mark.parametrize(
    "scores",
    [[1.0, 1.0], [0.0, 0.0, 0.0], [2.0, 2.0, 1.0], [1.0, 1.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.0, -0.2, 0.5]],
)
def test_leave_out_raises_only_where_no_list_orders_no_tie(scores):
    row = {"prompt": "hi", "completions": ["x"] * len(scores), "scores": scores}
    assert not has_ranking(scores)
    with pytest.raises(ValueError, match=r"row 4 \(prompt 'hi'\): no completion holds a score of its own"):
        row_ranks(row, index=4)


@settings(max_examples=60)
@given(
    scores=st.lists(st.integers(0, 3).map(float), min_size=2, max_size=6),
    k=st.one_of(st.none(), st.integers(1, 6)),
    shift=st.integers(0, 5),
)
def test_leave_out_never_orders_a_tie_and_ranks_whenever_a_list_can(scores, k, shift):
    """Each pick beats every completion left in its choice set; what leaves is tied and above the first pick."""
    row = {"completions": ["x"] * len(scores), "scores": scores}
    # A list that orders no tie exists iff some completion holds a score of its own above another's.
    exists = any(scores.count(s) == 1 and any(t < s for t in scores) for s in scores)
    assert has_ranking(scores) == exists
    if not exists:
        with pytest.raises(ValueError, match="no completion holds a score of its own"):
            row_ranks(row, k=k)
        return
    ranks = row_ranks(row, k=k)
    picks = sorted((r, j) for j, r in enumerate(ranks) if r >= 0)
    assert [r for r, _ in picks] == list(range(len(picks))) and 1 <= len(picks) <= (k or len(scores))
    for i, (_, a) in enumerate(picks):  # the choice set of pick i: later picks and the unranked
        rest = [j for r, j in picks[i + 1 :]] + [j for j, r in enumerate(ranks) if r == UNRANKED]
        assert all(scores[a] > scores[j] for j in rest) and (rest or i > 0)
    left = [j for j, r in enumerate(ranks) if r == IGNORE]
    assert all(scores.count(scores[j]) > 1 and scores[j] > scores[picks[0][1]] for j in left)
    try:
        assert ranks == row_ranks(row, k=k, ties="prefix")  # with an untied best, the same as "prefix"
    except ValueError:
        assert left
    s = shift % len(scores)
    rotated = {"completions": row["completions"], "scores": scores[s:] + scores[:s]}
    assert row_ranks(rotated, k=k) == ranks[s:] + ranks[:s]


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


# ------------------------------------------------------------------ sampled rows: the ids as sampled


@pytest.fixture(scope="module")
def fused():
    """A BPE tokenizer whose decoder joins tokens with nothing: sampled ``a``, ``b`` decode to ``ab``, one token."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c", " ", "ab", "ba"])}
    tok = Tokenizer(models.BPE(vocab, [("a", "b"), ("b", "a")], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    out.chat_template = (
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}c{% endif %}"
    )
    return out


A, B, C, SPACE, AB, BA, EOS = 4, 5, 6, 7, 8, 9, 2


def sampled(prompt="c", **row):
    """A sampled row: 'ab' written as a, b (re-tokenized it would be ab), 'c' cut, 'aba' as ab, a and ended."""
    return {
        "prompt": prompt,
        "completions": ["ab", "c", "aba"],
        "completion_ids": [[A, B, EOS], [C], [AB, A, EOS]],
        "truncated": [False, True, False],
        "scores": [2.0, 1.0, 0.0],
        **row,
    }


def completion_tokens(batch, b, j):
    return batch["input_ids"][b, j][batch["completion_mask"][b, j]].tolist()


def test_sampled_rows_are_trained_on_their_ids(fused):
    assert ids(fused, "ab") == [AB]  # what re-tokenizing the text would give
    chat = [{"role": "user", "content": "c"}]
    rows = [sampled(prompt_ids=[1, C]), sampled(chat)]
    padded = RankedPreferenceCollator(fused)(rows)
    packed = RankedPreferenceCollator(fused, layout="prefix_shared")(rows)
    for b, prompt in enumerate([[1, C], encode_prompt(fused, chat)[1]]):
        for j, want in enumerate([[A, B, EOS], [C], [AB, A, EOS]]):  # as sampled: the cut one has no EOS
            assert completion_tokens(padded, b, j) == want
            assert padded["input_ids"][b, j, : len(prompt)].tolist() == prompt
    assert packed["token_hash"].tolist() == padded["token_hash"].tolist()
    assert padded["token_hash"][0] == token_hash([1, C], [[A, B, EOS], [C], [AB, A, EOS]])


def test_a_cut_completion_gets_no_end_token_without_ids_either(tokenizer):
    rows = [{"prompt": "hi", "completions": ["a b", "c"], "truncated": [True, False], "scores": [1.0, 0.0]}]
    batch = RankedPreferenceCollator(tokenizer)(rows)
    assert completion_tokens(batch, 0, 0) == ids(tokenizer, "a b")  # cut: no EOS
    assert completion_tokens(batch, 0, 1) == ids(tokenizer, "c") + [tokenizer.eos_token_id]
    chat = [{**rows[0], "prompt": [{"role": "user", "content": "hi"}]}]
    batch = RankedPreferenceCollator(tokenizer)(chat)
    assert completion_tokens(batch, 0, 0) == ids(tokenizer, "a b")  # cut: no <end> of the template
    assert completion_tokens(batch, 0, 1) == ids(tokenizer, "c <end>")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"prompt_ids": [1, A]}, r"'prompt_ids' \(2 tokens\) are not the tokenizer's encoding .* from token 1 on"),
        ({"prompt_ids": [C]}, "are not the tokenizer's encoding"),  # another tokenizer: no BOS
        ({"completions": ["ab", "c", "abc"]}, r"completion 2 is 'abc', but its completion_ids decode to 'aba'"),
        ({"completion_ids": [[A, B, EOS], [C], [AB, 10]]}, r"completion_ids\[2\] must be a nonempty list of token ids"),
        ({"completion_ids": [[A, B, EOS], [], [AB, A]]}, r"completion_ids\[1\] must be a nonempty list"),
        ({"completion_ids": [[A, B, EOS], [C], [AB, -1]]}, r"completion_ids\[2\] .* in \[0, 10\)"),
        ({"completion_ids": [[A, B, EOS], [C]]}, "2 completion_ids for 3 completions"),
        ({"completion_ids": None, "prompt_ids": [1, C]}, "has 'prompt_ids' but no 'completion_ids'"),
        ({"truncated": [True]}, "'truncated' must be a list of one flag per completion"),
    ],
)
def test_ids_the_tokenizer_cannot_have_produced_are_refused_by_name(fused, change, match):
    with pytest.raises(ValueError, match=match) as info:
        RankedPreferenceCollator(fused)([sampled(), sampled(**change)], indices=[3, 4])
    assert "row 4 (prompt 'c')" in str(info.value)


def test_the_fingerprint_covers_the_ids(fused):
    """Same texts and lengths, other ids: the reference statistics of one row are stale for the other."""
    row = sampled()
    batch = RankedPreferenceCollator(fused)([row])
    stored = {"ref_logps": [-1.0, -2.0, -3.0], "ref_entropy_sums": [1.0, 1.0, 1.0], "ref_lengths": [3, 1, 3],
              "ref_token_hash": int(batch["token_hash"][0])}  # fmt: skip
    assert RankedPreferenceCollator(fused)([{**row, **stored}])["ref_lengths"].tolist() == [[3, 1, 3]]
    other = {**row, **stored, "completion_ids": [[A, B, EOS], [C], [A, BA, EOS]]}  # 'aba' too, three tokens
    with pytest.raises(ValueError, match="computed on other tokens"):
        RankedPreferenceCollator(fused)([other])


def test_the_statistics_of_a_completion_left_out_are_zero(fused):
    row = {**sampled(), "scores": [1.0, 1.0, 0.0]}  # no list: the tied best leave one completion
    with pytest.raises(ValueError, match="no completion holds a score of its own"):
        RankedPreferenceCollator(fused)([row])
    row = {**sampled(), "completions": ["ab", "c", "aba", "ba"], "completion_ids": [[A, B], [C], [AB, A], [BA]],
           "truncated": None, "scores": [1.0, 1.0, 0.5, 0.0]}  # fmt: skip
    batch = RankedPreferenceCollator(fused)([row])
    assert batch["ranks"].tolist() == [[IGNORE, IGNORE, 0, 1]]
    stored = {"ref_logps": [0.0, 0.0, -3.0, -1.0], "ref_entropy_sums": [0.0, 0.0, 1.0, 1.0],
              "ref_lengths": [0, 0, 2, 1], "ref_token_hash": int(batch["token_hash"][0])}  # fmt: skip
    assert RankedPreferenceCollator(fused)([{**row, **stored}])["ref_lengths"].tolist() == [[0, 0, 2, 1]]


@pytest.mark.parametrize(
    ("scores", "keep"),
    [([3, 2, 2, 1], (0, 3)), ([1, 3, 2, 1], (1, 2)), ([2, 2, 1, 1], None), ([0.5, 0.25], (0, 1)), ([1, 1], None),
     ([0, 1, 0, 0, 0], None)],
)  # fmt: skip
def test_best_and_worst_keeps_the_untied_extremes_and_cuts_every_per_completion_column(scores, keep):
    n = len(scores)
    row = {"prompt": "p", "completions": [f"c{j}" for j in range(n)], "scores": scores,
           "completion_ids": [[j] for j in range(n)], "truncated": [j % 2 == 0 for j in range(n)],
           "samples": [1] * n, "source": "kept whole"}  # fmt: skip
    pair = best_and_worst(row)
    if keep is None:
        assert pair is None
        return
    assert pair["completions"] == [f"c{j}" for j in keep] and pair["completion_ids"] == [[j] for j in keep]
    assert pair["scores"] == [scores[j] for j in keep] and pair["truncated"] == [j % 2 == 0 for j in keep]
    assert pair["samples"] == [1, 1] and pair["prompt"] == "p" and pair["source"] == "kept whole"
    assert row["completions"] == [f"c{j}" for j in range(n)]  # the row itself is left alone


@given(st.lists(st.integers(0, 4), min_size=2, max_size=7))
def test_best_and_worst_never_picks_a_tied_score(scores):
    alone = [s for s in scores if scores.count(s) == 1]
    pair = best_and_worst({"completions": list(range(len(scores))), "scores": scores})
    if len(alone) < 2:
        assert pair is None
    else:
        assert pair["scores"] == [max(alone), min(alone)]
