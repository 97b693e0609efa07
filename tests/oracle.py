"""Second, independent computations of the paper's formulas: plain Python loops per row.

They follow the paper's own formulas (Table 1, eq. 8, 9, 11, appendix D and F) rather
than the library's vectorized rewriting, so that agreement means something.
"""

from __future__ import annotations

import itertools
import math

import torch

from rcpo_losses import IGNORE, UNRANKED


def row_lists(ranks_row: list[int]) -> tuple[list[int], list[int], int]:
    """(picks y_1..y_k as slots, unranked slots, n) of one row."""
    picks = sorted((r, j) for j, r in enumerate(ranks_row) if r >= 0)
    unranked = [j for j, r in enumerate(ranks_row) if r == UNRANKED]
    return [j for _, j in picks], unranked, len(picks) + len(unranked)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def mnl_topk_row(r: list[float], ranks_row: list[int]) -> float:
    """Theorem 2 as written: -sum_i log sigma(-log sum_{j in S minus {y_1..y_i}} exp(r_j - r_{y_i}))."""
    picks, unranked, _ = row_lists(ranks_row)
    S = picks + unranked
    loss = 0.0
    for i, y in enumerate(picks):
        rest = [j for j in S if j not in picks[: i + 1]]
        if not rest:
            continue  # sigma(-log 0) = 1
        log_a = logsumexp([r[j] - r[y] for j in rest])
        # -log sigma(-log A) = log(1 + A) = softplus(log A)
        loss += max(log_a, 0.0) + math.log1p(math.exp(-abs(log_a)))
    return loss


def mallows_topk_row(r: list[float], ranks_row: list[int], w: float, step: bool = False) -> float:
    """Table 1 (Mallows-RMJ top-k); ``step=True`` uses the indicator of eq. 12 instead of sigma."""
    picks, unranked, n = row_lists(ranks_row)
    f = (lambda z: float(z > 0)) if step else sigmoid
    k = len(picks)
    total = sum((n - i) * f(r[picks[i]] - r[picks[i - 1]]) for i in range(1, k))  # 1-indexed i = this i
    total += sum(f(r[j] - r[picks[-1]]) for j in unranked)
    return w * total


def mnl_log_likelihood_row(r: list[float], ranks_row: list[int]) -> float:
    """Eq. 8: prod_i e^{r_{y_i}} / (sum_{j >= i} e^{r_{y_j}} + sum_U e^{r_h})."""
    picks, unranked, _ = row_lists(ranks_row)
    ll = 0.0
    for i, y in enumerate(picks):
        log_denom = logsumexp([r[j] for j in picks[i:]] + [r[h] for h in unranked])
        ll += r[y] - log_denom
    return ll


def q_int(i: int, phi: float) -> float:
    return sum(phi**e for e in range(i))


def psi(n: int, phi: float) -> float:
    return math.prod(q_int(i, phi) for i in range(1, n + 1))


def mallows_log_likelihood_row(r: list[float], ranks_row: list[int], phi: float) -> float:
    """Eq. 11 with mu_0 = slots by decreasing reward (ties: lower slot first)."""
    picks, unranked, n = row_lists(ranks_row)
    k = len(picks)
    slots = picks + unranked
    pos = {j: p for p, j in enumerate(sorted(slots, key=lambda j: (-r[j], j)))}  # mu_0^{-1}
    d = sum((n - i) * (pos[picks[i - 1]] > pos[picks[i]]) for i in range(1, k))
    d += sum(pos[picks[-1]] > pos[j] for j in unranked)
    return math.log(psi(n - k, phi) / psi(n, phi)) + d * math.log(phi)


def all_topk_lists(n_slots: list[int], k: int):
    """Every top-k list (as a tuple of picked slots) among the given slots."""
    yield from itertools.permutations(n_slots, k)


def ranks_row_from_picks(S: int, slots: list[int], picks: tuple[int, ...]) -> list[int]:
    row = [IGNORE] * S
    for j in slots:
        row[j] = UNRANKED
    for i, j in enumerate(picks):
        row[j] = i
    return row


def mnl_topk_grad_row(r: list[float], ranks_row: list[int]) -> list[float]:
    """Appendix F eq. 19 in reward space: dL/dr for one row.

    dL = -sum_i sigma(log A_i) [dr_{y_i} - sum_{j in S minus {y_1..y_i}} dr_j / sum_{j'} exp(r_{j'} - r_j)],
    A_i = sum_{j in S minus {y_1..y_i}} exp(r_j - r_{y_i}); sums of exponentials taken in log space.
    """
    picks, unranked, _ = row_lists(ranks_row)
    S = picks + unranked
    g = [0.0] * len(r)
    for i, y in enumerate(picks):
        rest = [j for j in S if j not in picks[: i + 1]]
        if not rest:
            continue
        lse_rest = logsumexp([r[j] for j in rest])
        weight = sigmoid(lse_rest - r[y])  # sigma(log A_i)
        g[y] -= weight
        for j in rest:
            g[j] += weight * math.exp(r[j] - lse_rest)  # 1 / sum_{j'} exp(r_{j'} - r_j)
    return g


def logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def mallows_topk_grad_row(r: list[float], ranks_row: list[int], w: float) -> list[float]:
    """Appendix F.2.3 in reward space: w * sum weight * sigma(1 - sigma) * (e_{worse} - e_{better})."""
    picks, unranked, n = row_lists(ranks_row)
    g = [0.0] * len(r)
    pairs = [(picks[i], picks[i - 1], n - i) for i in range(1, len(picks))]
    pairs += [(j, picks[-1], 1) for j in unranked]
    for worse, better, weight in pairs:
        s = sigmoid(r[worse] - r[better])
        g[worse] += w * weight * s * (1 - s)
        g[better] -= w * weight * s * (1 - s)
    return g


def rows(t: torch.Tensor) -> list[list]:
    return t.tolist()
