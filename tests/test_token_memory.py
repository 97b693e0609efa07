"""Peak memory of the chunked PyTorch path of ``token_logps_and_entropy`` on ``[4096, 32000]`` fp32.

Each measurement runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``
(``tests/peak_memory.py``): glibc then serves every block above 64 KiB with its own mmap
and returns it on free, so the resident set tracks live tensors (the CPU has no caching
allocator). The peak (``VmHWM``) is reset right after the logits are allocated, so it
measures forward + backward only.

Measured on the 2-core dev machine (torch 2.13 CPU), one copy of the logits = 500 MiB,
peak beyond the inputs and the gradient the backward must return: chunked path 0.035
copies (~18 MiB of chunk temporaries); naive ``log_softmax`` / ``softmax * log_softmax``
4.0 copies (~2 GiB).
"""

from __future__ import annotations

import pytest

from . import peak_memory

N, V = 4096, 32000
COPY = N * V * 4  # bytes of one fp32 copy of the logits

_SCRIPT = """
import torch
from rcpo_losses import token_logps_and_entropy

torch.set_num_threads(2)
N, V, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def naive(z, t):
    log_p = torch.log_softmax(z.float(), -1)
    logp = log_p.gather(-1, t[:, None]).squeeze(-1)
    ent = -(torch.softmax(z.float(), -1) * log_p).sum(-1)
    return logp, ent

g = torch.Generator().manual_seed(0)
x = torch.randn(N, V, generator=g).requires_grad_()
t = torch.randint(0, V, (N,), generator=g)
base = start()
if mode == "chunked":
    logp, ent = token_logps_and_entropy(x, t, backend="torch")
elif mode == "chunked_softcap":  # the transformed logits live only in the chunk buffers
    logp, ent = token_logps_and_entropy(x, t, backend="torch", softcap=30.0, logit_scale=1.5, temperature=0.7)
else:
    logp, ent = naive(x, t)
(logp.sum() + ent.sum()).backward()
print(json.dumps({"base": base, "peak": peak(), "grad": x.grad.numel() * x.grad.element_size()}))
"""


def _measure(mode: str) -> dict:
    r = peak_memory.run(_SCRIPT, N, V, mode)
    r["extra"] = r["peak"] - r["base"] - r["grad"]  # beyond the inputs and the gradient the backward returns
    return r


@pytest.mark.skipif(not peak_memory.SUPPORTED, reason="reads /proc and relies on glibc malloc")
def test_chunked_path_allocates_a_small_fraction_of_the_logits():
    chunked = _measure("chunked")
    assert chunked["grad"] == COPY
    # Chunk temporaries (~2^20 fp32 elements each) and the [N] outputs: a few percent of one copy.
    assert chunked["extra"] < 0.08 * COPY, f"chunked path used {chunked['extra'] / COPY:.3f} extra copies"
    capped = _measure("chunked_softcap")["extra"]
    assert capped < 0.08 * COPY, f"soft-capped chunked path used {capped / COPY:.3f} extra copies"

    naive = _measure("naive")
    # The contrast: log_softmax, softmax, their product and the backward's buffers.
    assert naive["extra"] > 2.5 * COPY, f"naive path used only {naive['extra'] / COPY:.2f} extra copies"
    print(f"\nextra copies of the [4096, 32000] fp32 logits: chunked {chunked['extra'] / COPY:.3f}, ", end="")
    print(f"soft-capped {capped / COPY:.3f}, ", end="")
    print(f"naive {naive['extra'] / COPY:.2f}")
