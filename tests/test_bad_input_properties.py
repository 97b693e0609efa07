"""The closing property of issue 10: no input class is left out.

Hypothesis draws rank tensors that are valid, invalid (duplicate or missing ranks, codes
such as -5, ranks past S, rows too small, no pick), of the wrong dtype or shape, with
log-probs that may hold NaN, inf, or values whose reward overflows fp32. Every public
function that takes ranks or scores must then either raise a ``ValueError``/``TypeError``
whose message starts with the name of an argument, or return finite values equal to the
per-row formulas of ``tests/oracle.py``. Unvalidated, an invalid row gives exactly 0.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rcpo_losses import (
    IGNORE,
    UNRANKED,
    all_pairs,
    mallows_rmj_discrete,
    mallows_rmj_log_likelihood,
    mallows_rmj_pairwise,
    mallows_rmj_topk,
    mallows_rmj_topk_from_rewards,
    mnl_discrete,
    mnl_log_likelihood,
    mnl_pairwise,
    mnl_topk,
    mnl_topk_from_rewards,
    ranking_metrics,
    ranks_from_scores,
    top_bottom_pair,
)

from . import oracle

W = 0.7  # neg_log_phi
BETA = 0.5
FP32_MAX = torch.finfo(torch.float32).max
CODES = [IGNORE, UNRANKED, UNRANKED, 0, 0, 1, 2, 3, 7, -5, -2]
NAMED = re.compile(
    r"^(ranks|policy_logps|ref_logps|rewards|beta|neg_log_phi|scores|mask|k"
    r"|policy_chosen_logps|policy_rejected_logps|ref_chosen_logps|ref_rejected_logps)\b"
)


def assert_names_an_argument(error: Exception) -> None:
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    assert NAMED.match(str(error)), f"message does not start with an argument name: {error}"


def row_is_valid(row: list[int], discrete: bool = False) -> bool:
    """A valid top-k list, decided here from the definition (DESIGN.md, 'Tensor conventions')."""
    if any(v < 0 and v not in (UNRANKED, IGNORE) for v in row):
        return False
    picks = sorted(v for v in row if v >= 0)
    n = sum(1 for v in row if v >= 0 or v == UNRANKED)
    return n >= 2 and len(picks) >= 1 and picks == list(range(len(picks))) and (not discrete or len(picks) == 1)


@st.composite
def rank_rows(draw, S: int) -> list[int]:
    if S >= 2 and draw(st.booleans()):  # a valid row
        n = draw(st.integers(2, S))
        k = draw(st.integers(1, n))
        slots = draw(st.permutations(range(S)))[:n]
        row = [IGNORE] * S
        for i, j in enumerate(slots):
            row[j] = i if i < k else UNRANKED
        return row
    return draw(st.lists(st.sampled_from(CODES), min_size=S, max_size=S))


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    S = draw(st.integers(1, 5))
    ranks = torch.tensor([draw(rank_rows(S)) for _ in range(B)])
    ranks = ranks.to(
        draw(st.sampled_from([torch.int64] * 6 + [torch.int32, torch.int8, torch.uint8, torch.float32, torch.bool]))
    )
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    policy = torch.randn(B, S, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    ref = torch.randn(B, S, generator=g, dtype=torch.float64)
    for _ in range(draw(st.integers(0, 2))):  # a few bad values, anywhere
        b, j = draw(st.integers(0, B - 1)), draw(st.integers(0, S - 1))
        kind = draw(st.sampled_from(["nan", "inf", "-inf", "overflow"]))
        if kind == "overflow":  # finite log-probs whose fp32 reward difference overflows
            policy[b, j], ref[b, j] = 3e38, -3e38
        else:
            draw(st.sampled_from([policy, ref]))[b, j] = float(kind)
    shape = draw(st.sampled_from(["2d"] * 8 + ["1d", "3d"]))
    if shape == "1d":
        ranks, policy, ref = ranks[0], policy[0], ref[0]
    elif shape == "3d":
        ranks, policy, ref = ranks[None], policy[None], ref[None]
    return ranks, policy.to(dtype), ref.to(dtype)


def _rewards(policy, ref):
    return [[BETA * (p - q) for p, q in zip(pr, qr, strict=True)] for pr, qr in zip(policy, ref, strict=True)]


def _in_assortment(v: int) -> bool:
    return v >= 0 or v == UNRANKED


# name -> (call(policy, ref, ranks, **kw), oracle row(r, row), takes log-probs, discrete)
FUNCTIONS = {
    "mnl_topk": (
        lambda p, q, k, **kw: mnl_topk(p, q, k, beta=BETA, reduction="none", **kw),
        oracle.mnl_topk_row,
        True,
        False,
    ),
    "mallows_rmj_topk": (
        lambda p, q, k, **kw: mallows_rmj_topk(p, q, k, beta=BETA, neg_log_phi=W, reduction="none", **kw),
        lambda r, row: oracle.mallows_topk_row(r, row, W),
        True,
        False,
    ),
    "mnl_discrete": (
        lambda p, q, k, **kw: mnl_discrete(p, q, k, beta=BETA, reduction="none", **kw),
        oracle.mnl_topk_row,
        True,
        True,
    ),
    "mallows_rmj_discrete": (
        lambda p, q, k, **kw: mallows_rmj_discrete(p, q, k, beta=BETA, neg_log_phi=W, reduction="none", **kw),
        lambda r, row: oracle.mallows_topk_row(r, row, W),
        True,
        True,
    ),
    "mnl_topk_from_rewards": (
        lambda r, _, k, **kw: mnl_topk_from_rewards(r, k, reduction="none", **kw),
        oracle.mnl_topk_row,
        False,
        False,
    ),
    "mallows_rmj_topk_from_rewards": (
        lambda r, _, k, **kw: mallows_rmj_topk_from_rewards(r, k, neg_log_phi=W, reduction="none", **kw),
        lambda r, row: oracle.mallows_topk_row(r, row, W),
        False,
        False,
    ),
    "mnl_log_likelihood": (
        lambda r, _, k, backend, **kw: mnl_log_likelihood(r, k, **kw),
        oracle.mnl_log_likelihood_row,
        False,
        False,
    ),
    "mallows_rmj_log_likelihood": (
        lambda r, _, k, backend, **kw: mallows_rmj_log_likelihood(r, k, W, **kw),
        lambda r, row: oracle.mallows_log_likelihood_row(r, row, math.exp(-W)),
        False,
        False,
    ),
}


def _expected(name, policy, ref, ranks):
    """(raise expected when validating, per-row expected values or None where undetermined)."""
    _, row_fn, takes_logps, discrete = FUNCTIONS[name]
    rows = ranks.long().tolist()
    if takes_logps:
        p64, q64 = policy.double().tolist(), ref.double().tolist()
        r = _rewards(p64, q64)
        inputs = [p64, q64]
    else:
        r = policy.double().tolist()
        inputs = [r]
    valid = [row_is_valid(row, discrete) for row in rows]

    def bad_slot(b, j):
        values = [x[b][j] for x in inputs]
        if not all(math.isfinite(v) for v in values):
            return True
        fp32 = policy.dtype == torch.float32  # the compute dtype
        return fp32 and takes_logps and (abs(values[0] - values[1]) > FP32_MAX or abs(r[b][j]) > FP32_MAX)

    bad_rows = [any(_in_assortment(v) and bad_slot(b, j) for j, v in enumerate(row)) for b, row in enumerate(rows)]
    if takes_logps and policy.dtype == torch.float32:  # the reward is computed in fp32 from fp32 inputs
        r = _rewards(policy.float().double().tolist(), ref.float().double().tolist())
    raises = not all(valid) or any(bad_rows)

    def want(b, row):
        if not valid[b]:
            return 0.0
        if bad_rows[b]:
            return None  # unvalidated NaN/inf in a valid row: nothing promised
        if max((abs(r[b][j]) for j, v in enumerate(row) if _in_assortment(v)), default=0.0) > 1e30:
            # |r| ~ 1e38: the stages lose all digits (issue 10, item 13), and the exact value may be
            # past the output dtype's range (then inf is its correct rounding); never NaN
            return math.inf
        return row_fn(r[b], row)

    return raises, [want(b, row) for b, row in enumerate(rows)]


def _check(name, case, backend, validate):
    ranks, policy, ref = case
    call = FUNCTIONS[name][0]
    try:
        out = call(policy, ref, ranks, backend=backend, validate=validate)
    except (ValueError, TypeError) as e:
        assert_names_an_argument(e)
        ok_types = ranks.dim() == 2 and not ranks.dtype.is_floating_point and ranks.dtype != torch.bool
        if ok_types and not validate:
            raise AssertionError(f"{name}(validate=False) raised on well-typed input: {e}") from e
        if ok_types:
            assert _expected(name, policy, ref, ranks)[0], f"{name} rejected valid input: {e}"
        return
    assert ranks.dim() == 2 and not ranks.dtype.is_floating_point and ranks.dtype != torch.bool
    raises, want = _expected(name, policy, ref, ranks)
    if validate:
        assert not raises, f"{name} accepted invalid input: ranks {ranks.tolist()}, values {policy.tolist()}"
    tol = 1e-12 if policy.dtype == torch.float64 else 2e-5
    for b, w in enumerate(want):
        if w is None:
            continue
        got = float(out[b])
        if w == math.inf:
            assert not math.isnan(got), (name, b, got)
            continue
        assert math.isfinite(got), (name, b, got)
        assert got == pytest.approx(w, rel=tol, abs=tol), (name, b, got, w)


@settings(max_examples=50)
@given(case=cases(), name=st.sampled_from(sorted(FUNCTIONS)), backend=st.sampled_from(["torch", "triton"]))
@example(
    case=(torch.tensor([[0, 0, UNRANKED]]), torch.zeros(1, 3), torch.zeros(1, 3)), name="mnl_topk", backend="triton"
)
@example(case=(torch.tensor([0, UNRANKED]), torch.zeros(2), torch.zeros(2)), name="mnl_discrete", backend="torch")
def test_every_loss_raises_a_named_error_or_matches_the_oracle(case, name, backend):
    _check(name, case, backend, validate=True)
    _check(name, case, backend, validate=False)


# --- ranking_metrics and all_pairs --------------------------------------------------------------


def _metrics_oracle(r, rows):
    """ranking_metrics from its docstring, over the valid rows."""
    per_row = []
    for rr, row in zip(r, rows, strict=True):
        if not row_is_valid(row):
            continue
        picks, unranked, _ = oracle.row_lists(row)
        top, others = picks[0], [j for j in picks[1:] + unranked]
        implied = [(picks[i], j) for i in range(len(picks)) for j in picks[i + 1 :] + unranked]
        mean_other = sum(rr[j] for j in others) / len(others)
        per_row.append(
            [
                float(all(rr[top] > rr[j] for j in others)),
                sum(rr[a] > rr[b] for a, b in implied) / len(implied),
                rr[top],
                mean_other,
                rr[top] - mean_other,
            ]
        )
    n = max(len(per_row), 1)
    return [sum(col) / n for col in zip(*per_row, strict=True)] if per_row else [0.0] * 5


def _pairs_oracle(rows):
    pairs = []
    for b, row in enumerate(rows):
        if row_is_valid(row):
            picks, unranked, _ = oracle.row_lists(row)
            pairs += [(b, picks[i], j) for i in range(len(picks)) for j in picks[i + 1 :] + unranked]
    return sorted(pairs)


@settings(max_examples=50)
@given(case=cases(), validate=st.booleans())
@example(  # the mean of two rewards of 3e38 is 3e38, not inf
    case=(torch.tensor([[UNRANKED, UNRANKED, 0]]), torch.tensor([[3e38, 3e38, -0.2]]), None), validate=True
)
@example(case=(torch.tensor([[0, 0, UNRANKED]]), torch.zeros(1, 3), None), validate=True)
def test_metrics_and_pairs_raise_a_named_error_or_match_the_oracle(case, validate):
    ranks, values, _ = case
    well_typed = ranks.dim() == 2 and not ranks.dtype.is_floating_point and ranks.dtype != torch.bool
    rows = ranks.long().tolist() if well_typed else None
    for fn in ("metrics", "pairs"):
        try:
            out = (
                ranking_metrics(values, ranks, validate=validate)
                if fn == "metrics"
                else all_pairs(ranks, validate=validate)
            )
        except (ValueError, TypeError) as e:
            assert_names_an_argument(e)
            assert not (well_typed and not validate), e
            continue
        assert well_typed
        if validate:
            assert all(row_is_valid(row) for row in rows)
        if fn == "pairs":
            got = sorted(
                zip(
                    out.row.tolist(),
                    (out.ranks == 0).int().argmax(-1).tolist(),
                    (out.ranks == UNRANKED).int().argmax(-1).tolist(),
                    strict=True,
                )
            )
            assert got == _pairs_oracle(rows)
            assert ((out.ranks != IGNORE).sum(-1) == 2).all()
            continue
        r = values.double().tolist()
        finite = all(
            math.isfinite(r[b][j])
            for b, row in enumerate(rows)
            if row_is_valid(row)
            for j, v in enumerate(row)
            if _in_assortment(v)
        )
        if validate:
            assert finite
        if finite:
            got = [
                float(out[key])
                for key in ("top1_accuracy", "pairwise_accuracy", "top_reward", "other_reward", "margin")
            ]
            tol = 1e-12 if values.dtype == torch.float64 else 1e-5
            # rounded to the output dtype: a margin of two finite fp32 rewards may be past fp32's range
            want = torch.tensor(_metrics_oracle(r, rows), dtype=torch.float64).to(values.dtype).tolist()
            assert got == pytest.approx(want, rel=tol, abs=tol)


# --- ranks_from_scores and top_bottom_pair --------------------------------------------------------


@st.composite
def scored(draw):
    B, S = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    values = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -float("inf")]))
    scores = torch.tensor([[draw(values) for _ in range(S)] for _ in range(B)], dtype=torch.float64)
    mask = torch.tensor([[draw(st.booleans()) for _ in range(S)] for _ in range(B)]) if draw(st.booleans()) else None
    k = draw(st.one_of(st.none(), st.integers(-1, 6), st.just(1.5)))
    return scores, mask, k


def _scores_oracle(scores, mask, k):
    """Per row: masked slots by decreasing score (NaN never present here), ties by slot."""
    out = []
    for b, row in enumerate(scores.tolist()):
        present = [j for j in range(len(row)) if mask is None or mask[b][j]]
        order = sorted(present, key=lambda j: (-row[j], j))
        kb = len(present) if k is None else min(k, len(present))
        ranks = [IGNORE] * len(row)
        for pos, j in enumerate(order):
            ranks[j] = pos if pos < kb else UNRANKED
        out.append(ranks)
    return out


@settings(max_examples=50)
@given(case=scored())
@example(case=(torch.tensor([[0.0, 0.0, -math.inf]]), torch.tensor([[False, False, True]]), None))  # -inf vs mask
@example(case=(torch.tensor([[0.5, math.nan]]), None, 1))
def test_score_functions_raise_a_named_error_or_match_the_oracle(case):
    scores, mask, k = case
    mask_l = None if mask is None else mask.tolist()
    nan_inside = any(
        math.isnan(v) and (mask_l is None or mask_l[b][j])
        for b, row in enumerate(scores.tolist())
        for j, v in enumerate(row)
    )
    try:
        got = ranks_from_scores(scores, k, mask)
    except (ValueError, TypeError) as e:
        assert_names_an_argument(e)
        assert nan_inside or k == 1.5 or (k is not None and k < 0), e
    else:
        assert not nan_inside and k != 1.5 and (k is None or k >= 0)
        assert got.tolist() == _scores_oracle(scores, mask_l, k)
    try:
        tb = top_bottom_pair(scores, mask)
    except (ValueError, TypeError) as e:
        assert_names_an_argument(e)
        assert nan_inside, e
    else:
        assert not nan_inside
        full = _scores_oracle(scores, mask_l, None)
        for row, want in zip(tb.tolist(), full, strict=True):
            n = sum(v != IGNORE for v in want)
            assert row == [0 if v == 0 else UNRANKED if (v == n - 1 and n >= 2) else IGNORE for v in want]


# --- the pairwise losses ([B] inputs, no ranks) -----------------------------------------------------


@st.composite
def pairs(draw):
    B = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(4, B, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    for _ in range(draw(st.integers(0, 2))):
        i, b = draw(st.integers(0, 3)), draw(st.integers(0, B - 1))
        kind = draw(st.sampled_from(["nan", "inf", "overflow"]))
        if kind == "overflow":
            x[i, b], x[i ^ 2, b] = 3e38, -3e38  # policy vs ref of the same side
        else:
            x[i, b] = float(kind)
    inputs = list(x.to(dtype).unbind(0))
    if draw(st.booleans()):
        inputs[2] = inputs[3] = None
    shape = draw(st.sampled_from(["ok"] * 6 + ["0-d", "2-d", "short"]))
    which = draw(st.integers(0, 3))
    if inputs[which] is not None and shape != "ok":
        v = inputs[which]
        inputs[which] = {"0-d": v[0], "2-d": v[:, None], "short": v[:0]}[shape]
    return inputs


@settings(max_examples=50)
@given(inputs=pairs(), model=st.sampled_from(["mnl", "mallows"]))
@example(inputs=[torch.zeros(3), torch.tensor([0.0, math.nan, 0.0]), None, None], model="mnl")
def test_pairwise_losses_raise_a_named_error_or_match_the_oracle(inputs, model):
    pc, pr, rc, rr = inputs
    fn = mnl_pairwise if model == "mnl" else lambda *a, **kw: mallows_rmj_pairwise(*a, neg_log_phi=W, **kw)
    try:
        out = fn(pc, pr, rc, rr, beta=BETA, reduction="none")
    except (ValueError, TypeError) as e:
        assert_names_an_argument(e)
        assert not str(e).startswith(("policy_logps", "ref_logps")), f"names the stacked [B, 2] tensor: {e}"
        return
    assert all(x is None or x.shape == pc.shape and pc.dim() == 1 for x in inputs)
    refs = (rc, rr) if rc is not None else (torch.zeros_like(pc), torch.zeros_like(pc))
    fp32 = pc.dtype == torch.float32
    for b in range(pc.shape[0]):
        p = [float(pc[b]), float(pr[b])]
        q = [float(refs[0][b]), float(refs[1][b])]
        assert all(map(math.isfinite, p + q)), "non-finite input accepted"
        diffs = [p[0] - q[0], p[1] - q[1]]
        assert not (fp32 and any(abs(d) > FP32_MAX for d in diffs)), "overflowing reward accepted"
        if fp32:  # the rewards are computed in fp32
            diffs = [
                float(torch.tensor(p[i], dtype=torch.float32) - torch.tensor(q[i], dtype=torch.float32)) for i in (0, 1)
            ]
        r = [BETA * d for d in diffs]
        got = float(out[b])
        if max(map(abs, r)) > 1e30:  # see _expected: never NaN
            assert not math.isnan(got)
            continue
        want = oracle.mnl_topk_row(r, [0, UNRANKED]) if model == "mnl" else W * oracle.sigmoid(r[1] - r[0])
        tol = 1e-12 if pc.dtype == torch.float64 else 2e-5
        assert got == pytest.approx(want, rel=tol, abs=tol)
