"""Other libraries' versions of what rcpo-losses computes, as benchmark rows (the ``bench`` extra).

    pip install -e ".[bench]"   # trl==1.16.0, liger-kernel==0.8.5, cut-cross-entropy==25.1.1

Each entry is ``None`` when its package is not installed (or, for Liger, without CUDA), and
the benchmarks skip its rows. Not run on its own: ``bench_tokens.py`` and ``bench_fused_linear.py``
import it. What each one computes:

- ``trl`` (``trl.trainer.utils.selective_log_softmax_and_entropy(logits, index)``): target
  log-prob and entropy from logits. On CUDA a Triton kernel in the logits' dtype; elsewhere
  ``selective_log_softmax`` (a row loop in the logits' dtype for bf16) and
  ``entropy_from_logits`` (chunks of 128 rows, fp32 inside).
- ``trl.chunked`` (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``, tile 32768):
  target log-prob and entropy from hidden states and the LM head, never holding the logits;
  tiles of 4096 tokens x 32768 vocabulary entries; gradients accumulated in fp32.
- ``cce`` (cut-cross-entropy's ``linear_cross_entropy(h, w, t, reduction="none")``): the
  per-token cross-entropy, i.e. minus the target log-prob, from hidden states and the LM
  head; no entropy. ``impl="cce"`` (Triton kernels) on CUDA, ``impl="torch_compile"`` on the
  CPU (``h @ w.T`` then ``F.cross_entropy`` under ``torch.compile``: the logits are held).
- ``liger`` (CUDA only: ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``,
  ``reduction="none"``): the same per-token cross-entropy, chunked over tokens; no entropy.

So ``cce`` and ``liger`` compare with rcpo-losses' ``entropy=False`` rows (``fused.noent``)
as well as with the full ones.
"""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _trl_token_stats():
    try:
        from trl.trainer.utils import selective_log_softmax_and_entropy
    except ImportError:
        return None
    return selective_log_softmax_and_entropy


def _trl_chunked():
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError:
        return None

    def run(h, w, t):
        logp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768, None, 1.0, ("entropy",))
        return logp, ent

    return run


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    impl = "cce" if DEVICE == "cuda" else "torch_compile"

    def run(h, w, t):
        return -linear_cross_entropy(h, w, t, reduction="none", impl=impl), None

    return run


def _liger():
    if DEVICE != "cuda":
        return None
    try:  # its import needs Triton with a GPU driver
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # any import-time failure means "not available"
        return None

    def run(h, w, t):
        return -liger_fused_linear_cross_entropy(h, w, t, reduction="none"), None

    return run


# name -> fn(logits, targets) -> (logp, entropy)
TOKEN_PEERS = {"trl": _trl_token_stats()}
# name -> fn(hidden, weight, targets) -> (logp, entropy or None)
FUSED_PEERS = {"trl.chunked": _trl_chunked(), "cce": _cce(), "liger": _liger()}
