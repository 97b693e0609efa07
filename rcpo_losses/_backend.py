"""Backend choice: Triton kernels on CUDA, the PyTorch reference everywhere else.

The one place that decides: the losses ask ``use_triton`` (token statistics) or
``use_choice_kernel`` (choice models, which adds the kernels' width limit); the kernel
wrappers in ``choice_ops``/``token_ops`` only run kernels and never import the losses.
"""

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


def use_choice_kernel(backend: str, rewards: Tensor) -> bool:
    """Whether a choice-model loss runs its Triton kernel on ``rewards [B, S]`` under ``backend``.

    As :func:`use_triton`, and the row must fit the kernels' one block,
    ``S <= rcpo_losses.kernels.choice_common.MAX_BLOCK_S``; wider rows run the PyTorch
    reference, with the same result. Triton is imported only when the Triton path is taken.
    """
    if not use_triton(backend, rewards):
        return False
    from .kernels.choice_common import MAX_BLOCK_S

    return rewards.shape[-1] <= MAX_BLOCK_S
