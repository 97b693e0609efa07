"""Backend choice: Triton kernels on CUDA, the PyTorch reference everywhere else."""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


# Looked up once, without importing triton; a plain constant is free for torch.compile to trace.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return TRITON_AVAILABLE


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, x: Tensor) -> bool:
    """Whether to run the Triton kernel for tensor ``x`` under ``backend``.

    ``"auto"`` takes Triton for CUDA tensors when Triton imports, else PyTorch.
    ``"triton"`` insists: it raises if Triton is missing, or if ``x`` is on the CPU and
    the Triton interpreter (``TRITON_INTERPRET=1``) is not on.
    """
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and triton_available()
    if backend != "triton":
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not triton_available():
        raise RuntimeError("backend='triton': Triton is not installed (pip install triton)")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            f"backend='triton': tensors are on {x.device}; Triton kernels need CUDA tensors, "
            "or TRITON_INTERPRET=1 set before triton is first imported to run them on the CPU"
        )
    return True
