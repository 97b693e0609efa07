"""Backend choice: Triton kernels on CUDA, the PyTorch reference everywhere else.

The one place that decides. The ops ask :func:`use_triton` (token statistics, the fused LM
head), :func:`use_choice_kernel` (choice models, which adds the kernels' width limit) and
:func:`fp32_matmul_operands` (the CPU's chunk matmuls), and then run the Triton kernel of
``rcpo_losses.kernels`` or its twin in :mod:`rcpo_losses.reference`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import time
import warnings

import torch
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
    from ..kernels.choice_common import MAX_BLOCK_S

    return rewards.shape[-1] <= MAX_BLOCK_S


# CPUs without a bf16/fp16 matrix unit (AVX2-only x86) run some bf16 products on a slow
# fallback: ``[128, 32000] @ [32000, 512]`` took 6.5 s there against 0.04 s in fp32. On such a
# CPU the PyTorch path does its chunk matmuls on fp32 operands (one fp32 copy of the weight and
# bias per pass, the size of the fp32 gradient accumulator; the hidden states converted one
# chunk at a time), which also makes the chunk's logits fp32 directly. None: probe (once per
# dtype and process); True/False: force it on or off.
CPU_FP32_MATMUL: bool | None = None


@functools.cache
def slow_cpu_matmul(dtype: torch.dtype) -> bool:
    """Probe: is ``[128, 2048] @ [2048, 256]`` in ``dtype`` more than 4x slower than in fp32 on this CPU?

    The fallback's slowdown is 40x to 300x, so the margin absorbs the noise of a busy machine.
    Constant inputs: the probe does not touch the random number generator.
    """

    def best(a: Tensor, b: Tensor) -> float:
        torch.mm(a, b)  # warm-up (oneDNN builds its kernel on the first call)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    a, b = torch.full((128, 2048), 0.5), torch.full((2048, 256), 0.25)
    return best(a.to(dtype), b.to(dtype)) > 4 * best(a, b)


def fp32_matmul_operands(x: Tensor) -> bool:
    """Whether the PyTorch chunk path should do the matmuls of ``x``'s dtype on fp32 operands (see above)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return slow_cpu_matmul(x.dtype) if CPU_FP32_MATMUL is None else CPU_FP32_MATMUL


# The CPU backward of the fused LM head over vocabulary tiles (no fp32 [V, H] accumulator; see
# rcpo_losses.ops.fused_linear). None: on for every CPU tensor that does not take the fp32-operand
# path; True/False: force it.
CPU_VOCAB_TILES: bool | None = None


def cpu_vocab_tiles(x: Tensor, use_triton: bool, cast: bool) -> bool:
    """Whether the fused LM head's PyTorch backward walks vocabulary tiles (``rcpo_losses.ops.fused_linear``).

    ``cast``: the chunk matmuls take fp32 operands (:func:`fp32_matmul_operands`), which keeps token chunks.
    """
    if use_triton or cast or x.device.type != "cpu":
        return CPU_VOCAB_TILES is True and not use_triton and not cast
    return CPU_VOCAB_TILES is not False


# The CPU's prefix-shared attention: sdpa over the packed batch's segments
# (rcpo_losses.training.segment_attention), each completion against its prompt and itself, instead of sdpa with
# the dense [P, P] mask, which computes all P^2 pairs. None: on for CPU tensors; True/False: force it on or off
# (True: on every device).
CPU_SEGMENT_ATTENTION: bool | None = None


def segment_attention(x: Tensor) -> bool:
    """Whether an ``sdpa`` model's prefix-shared forward on ``x`` (its input ids) runs over segments (see above)."""
    if CPU_SEGMENT_ATTENTION is not None:
        return CPU_SEGMENT_ATTENTION
    return x.device.type == "cpu"


# The tile math of that path (rcpo_losses.reference.token_stats.tile_stats, tile_logits_grad) is a
# handful of elementwise passes over each [rows, cols] tile; eager PyTorch runs each as its own
# sweep through memory, inductor fuses them into one loop. None: compile where inductor can
# build C++ (a compiler on the PATH; the first failure falls back to eager for the rest of the
# process, with one warning); True/False: force it on or off. fp64 (the verification dtype) stays eager.
# The environment variable RCPO_LOSSES_CPU_COMPILE (1/0, true/false, on/off, yes/no) sets it for a process
# and its children.
ON, OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_switch(name: str) -> bool | None:
    """The environment variable ``name`` as a switch: True for 1/true/on/yes, False for 0/false/off/no (any case).

    None when it is unset or empty; any other value raises ``ValueError`` naming the variable.
    """
    value = os.environ.get(name, "")
    word = value.strip().lower()
    if word in ON or word in OFF or not word:
        return None if not word else word in ON
    raise ValueError(f"{name}={value!r}: expected one of {'/'.join(ON)} (on) or {'/'.join(OFF)} (off), or unset")


CPU_COMPILE: bool | None = env_switch("RCPO_LOSSES_CPU_COMPILE")
_COMPILE_FAILED: list[BaseException] = []


# Each distinct dtype, transform, tile width and set of optional gradients is one graph (only the
# token dimension is dynamic); dynamo's default of 8 per function would send a process that meets
# more of them back to eager.
RECOMPILE_LIMIT = 64
COMPILED_CALLS = [0]  # how many tile steps ran compiled (the tests check that they did)


@functools.cache
def _cpu_compiler_found() -> bool:
    try:
        from torch._inductor import config

        names = [c for c in config.cpp.cxx if c] or ["g++"]
    except Exception:  # an inductor without that setting: let the first compile decide
        return True
    return any(shutil.which(c) for c in names)


def cpu_compile(dtype: torch.dtype) -> bool:
    """Whether the CPU tile math for ``dtype`` runs compiled (see ``CPU_COMPILE`` above)."""
    if _COMPILE_FAILED or dtype == torch.float64:
        return False
    return _cpu_compiler_found() if CPU_COMPILE is None else CPU_COMPILE


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True)


def cpu_tile_step(fn, dtype: torch.dtype):
    """``fn`` (a pure function of tensors), compiled with inductor when :func:`cpu_compile` allows, else itself.

    Only the leading (token) dimension of the tensor arguments is dynamic: every other size, and
    every non-tensor argument, is fixed per graph. A tile's width is its inner loop, and a fixed
    width let inductor emit code 1.4x (fp32 tile statistics) to 2.9x (fp32 logits gradient)
    faster than fully dynamic shapes, at the price of one graph per width (two per vocabulary:
    the full tiles and the last).

    A compile or run failure of the compiled ``fn`` (no working C++ toolchain, an inductor bug)
    turns compilation off for the process and reruns the call eagerly.
    """
    if not cpu_compile(dtype):
        return fn

    def step(*args):
        if not _COMPILE_FAILED:
            try:
                for x in args:
                    if isinstance(x, Tensor) and x.dim():
                        torch._dynamo.maybe_mark_dynamic(x, 0)
                config = {"recompile_limit": RECOMPILE_LIMIT, "automatic_dynamic_shapes": False}
                with torch._dynamo.config.patch(**config):
                    out = _compiled(fn)(*args)
                COMPILED_CALLS[0] += 1
                return out
            except Exception as e:  # noqa: BLE001 - any failure of the compiler means: run eagerly
                _COMPILE_FAILED.append(e)
                warnings.warn(
                    f"rcpo_losses: compiling the CPU tile step failed ({type(e).__name__}: {e}); "
                    "running it eagerly from now on (rcpo_losses.ops.backend.CPU_COMPILE = False silences this)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return fn(*args)

    return step
