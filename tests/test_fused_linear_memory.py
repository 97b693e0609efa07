"""Peak memory of ``fused_linear_token_stats`` at ``N = 8192`` tokens, ``H = 256``, ``V = 32000``, fp32.

One full fp32 logits tensor ``[8192, 32000]`` is 1.05 GB. Each measurement runs in a fresh
subprocess (``tests/peak_memory.py``: ``MALLOC_MMAP_THRESHOLD_=65536``, peak resident set
reset after the inputs are built and after one tiny warm-up call, so that the one-off
import of the custom-op machinery is not counted). "Extra" is the peak beyond the inputs
(``hidden``, ``weight``) and the gradients the backward must return (``grad_hidden``,
``grad_weight``); the ``[N]`` outputs are counted in it.

Measured on the 2-core dev machine (torch 2.13 CPU), in copies of the fp32 logits:

- fused, forward + backward (default chunk: 128 rows): 0.053 (56 MB: one chunk of logits and
  the two fp32 buffers of the chunk math);
- fused, forward under ``torch.no_grad()`` (the reference model): 0.053;
- unfused, ``token_logps_and_entropy(hidden @ weight.T)`` (its chunked path), forward + backward:
  1.98 (the logits and their gradient);
- fully naive ``log_softmax`` formulas on ``hidden @ weight.T``, forward + backward: 4.97 (not run
  by the test, to keep it short: ``python -c "from tests.test_fused_linear_memory import extra_copies as
  f; print(f('naive'))"``).
"""

from __future__ import annotations

import pytest

from . import peak_memory

N, H, V = 8192, 256, 32000
COPY = N * V * 4  # bytes of one fp32 logits tensor

_SCRIPT = """
import torch
from rcpo_losses import fused_linear_token_stats, token_logps_and_entropy

torch.set_num_threads(2)
N, H, V, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def run(h, W, t):
    if mode == "unfused":
        return token_logps_and_entropy(h @ W.T, t, backend="torch")
    if mode == "naive":
        log_p = torch.log_softmax(h @ W.T, -1)
        return log_p.gather(-1, t[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
    if mode == "fused_no_grad":
        with torch.no_grad():
            return fused_linear_token_stats(h, W, t, backend="torch")
    return fused_linear_token_stats(h, W, t, backend="torch")

g = torch.Generator().manual_seed(0)
h = (torch.randn(N, H, generator=g) / H**0.5).requires_grad_()
W = torch.randn(V, H, generator=g).requires_grad_()
t = torch.randint(0, V, (N,), generator=g)
# Warm-up on a tiny slice: the first call of a custom op imports and registers things once.
w = run(h[:2].detach().requires_grad_(), W[:3].detach().requires_grad_(), t[:2] % 3)
if w[0].requires_grad:
    (w[0].sum() + w[1].sum()).backward()
del w
base = start()
logp, ent = run(h, W, t)
if logp.requires_grad:
    (logp.sum() + ent.sum()).backward()
grads = sum(x.grad.numel() * x.grad.element_size() for x in (h, W) if x.grad is not None)
print(json.dumps({"base": base, "peak": peak(), "grads": grads}))
"""


def _extra(mode: str) -> int:
    """Peak bytes beyond the inputs and the returned gradients, for ``mode`` in
    ``fused``, ``fused_no_grad``, ``unfused``, ``naive``."""
    r = peak_memory.run(_SCRIPT, N, H, V, mode)
    if mode != "fused_no_grad":
        assert r["grads"] == (N + V) * H * 4
    return r["peak"] - r["base"] - r["grads"]


def extra_copies(mode: str) -> float:
    return _extra(mode) / COPY


@pytest.mark.skipif(not peak_memory.SUPPORTED, reason="reads /proc and relies on glibc malloc")
def test_fused_linear_holds_a_small_fraction_of_the_logits():
    fused = _extra("fused")
    assert fused < 0.10 * COPY, f"fused forward + backward used {fused / COPY:.3f} extra copies of the logits"
    no_grad = _extra("fused_no_grad")
    assert no_grad < 0.10 * COPY, f"fused forward (no grad) used {no_grad / COPY:.3f} extra copies"
    # The contrast: the unfused path holds the logits and then their gradient, each a full copy.
    unfused = _extra("unfused")
    assert unfused > 1.5 * COPY, f"unfused path used only {unfused / COPY:.2f} extra copies"
    print(
        f"\nextra copies of the [{N}, {V}] fp32 logits: fused {fused / COPY:.3f}, "
        f"fused no-grad {no_grad / COPY:.3f}, unfused {unfused / COPY:.2f}"
    )
