"""Hypothesis strategies for ranked-choice batches, shared by the test modules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

from rcpo_losses import IGNORE, UNRANKED


@dataclass
class Batch:
    policy: torch.Tensor  # [B, S] float64; padding slots hold NaN or inf
    ref: torch.Tensor  # [B, S] float64
    ranks: torch.Tensor  # [B, S] int64
    scale: float

    @property
    def valid(self) -> torch.Tensor:
        return self.ranks != IGNORE


def make_ranks(rng: np.random.Generator, B: int, S: int, min_n: int = 2, full_k: float = 0.2) -> torch.Tensor:
    """Random rank tensor: per row a random |S_b| in [min_n, S], k_b in [1, |S_b|], slots shuffled."""
    ranks = np.full((B, S), IGNORE, dtype=np.int64)
    for b in range(B):
        n = int(rng.integers(min_n, S + 1))
        k = n if rng.random() < full_k else int(rng.integers(1, n + 1))
        slots = rng.permutation(S)[:n]
        ranks[b, slots] = UNRANKED
        ranks[b, slots[:k]] = np.arange(k)
    return torch.from_numpy(ranks)


def make_batch(seed: int, B: int, S: int, scale: float, pad_value: float = float("nan")) -> Batch:
    rng = np.random.default_rng(seed)
    ranks = make_ranks(rng, B, S)
    policy = torch.from_numpy(rng.normal(size=(B, S)) * scale)
    ref = torch.from_numpy(rng.normal(size=(B, S)) * scale)
    pad = ranks == IGNORE
    policy = policy.masked_fill(pad, pad_value)
    ref = ref.masked_fill(pad, -pad_value if pad_value == pad_value else pad_value)
    return Batch(policy, ref, ranks, scale)


@st.composite
def batches(draw, max_b: int = 8, min_s: int = 2, max_s: int = 16, scales=(1e-3, 1e-1, 1.0, 10.0, 1e3)) -> Batch:
    """Random batch: B rows, S slots, random |S_b| and k_b, padding holding NaN or inf."""
    B = draw(st.integers(1, max_b))
    S = draw(st.integers(min_s, max_s))
    scale = draw(st.sampled_from(scales))
    pad = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_batch(seed, B, S, scale, pad)
