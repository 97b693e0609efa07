"""Every kernel launch compiled for real GPU targets, without a GPU: registers, spills, occupancy, load widths.

The launchers (``rcpo_losses.kernels.mnl``, ``.mallows``, ``.token_stats``) are run on
``device="meta"`` tensors with each ``@triton.jit`` kernel of their module replaced by a
recorder, so the test sees exactly the arguments, constexprs and ``num_warps`` a real
launch passes. Each launch is then specialized by Triton's own binder (ints equal to 1
become constexprs; ints divisible by 16 and 16-byte aligned pointers get divisibility 16,
as for a contiguous tensor from PyTorch's allocator) and compiled with ``triton.compile``
for sm_80, sm_90, sm_100 (ptxas ships with Triton) and gfx942 (Triton's AMD backend).

From each binary: registers, spills (``cuobjdump --dump-resource-usage`` for stack/local
bytes, then the STL/LDL instructions of the SASS; ``.vgpr_spill_count`` and
``.sgpr_spill_count`` on AMD), shared memory, theoretical occupancy in warps per SM with
its limiter (NVIDIA), and the width in bits of every global load and store, attributed to
the pointer argument it reads or writes (PTX def-use chains).

Must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions
by functions the compiler cannot take); ``tests/test_gpu_compile.py`` runs it in a
subprocess:

    python benchmarks/compile_static.py [--full] [--targets sm_90,gfx942] [--jobs N] --json out.json

Compiles are cached by Triton (``TRITON_CACHE_DIR``, default ``~/.triton/cache``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("compile_static: run without TRITON_INTERPRET=1 (the interpreter is not the compiler)")

import torch  # noqa: E402
import triton  # noqa: E402
from rcpo_losses.kernels import mallows as mallows_kernels  # noqa: E402
from rcpo_losses.kernels import mnl as mnl_kernels  # noqa: E402
from rcpo_losses.kernels import token_stats as token_kernels  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGETS = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "sm_100": GPUTarget("cuda", 100, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}
#: Per SM: registers, shared memory bytes, resident warps, resident blocks (CUDA occupancy tables).
SM_LIMITS = {
    "sm_80": (65536, 167936, 64, 32),
    "sm_90": (65536, 233472, 64, 32),
    "sm_100": (65536, 233472, 64, 32),
}

# The grid of the issue: choice S, rewards and ranks dtypes; token-stats dtypes and V.
CHOICE_S = (2, 4, 8, 16, 64, 512, 4096)
CHOICE_DTYPES = (torch.float32, torch.float64)
RANK_DTYPES = (torch.int32, torch.int64)
TOKEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
TOKEN_V = (32000, 128256, 151936)
CHOICE_B = 4096
TOKEN_N = 16384
# Default (reduced) set: every kernel, the usual S, both rewards dtypes, both token widths.
REDUCED_CHOICE = {(S, dt, torch.int64) for S in (2, 8, 16, 512) for dt in CHOICE_DTYPES} | {
    (8, torch.float32, torch.int32),
    (64, torch.float32, torch.int64),
    (4096, torch.float32, torch.int64),
}
REDUCED_TOKEN = {(torch.bfloat16, 128256), (torch.float32, 32000)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call of a launcher, with its grid point."""

    kernel: str  # module:function
    args: tuple
    kwargs: dict
    config: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def fn(self) -> JITFunction:
        module, name = self.kernel.split(":")
        return getattr(sys.modules[module], name)


class _Recorder:
    def __init__(self, fn: JITFunction, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((f"{self.fn.fn.__module__}:{self.fn.fn.__name__}", args, kwargs))

        return launch


def record(module, launcher, *args, **kwargs) -> list[tuple[str, tuple, dict]]:
    """The launches ``launcher(*args, **kwargs)`` makes, with every jit function of ``module`` intercepted."""
    sink: list = []
    saved = {k: v for k, v in vars(module).items() if isinstance(v, JITFunction)}
    try:
        for k, v in saved.items():
            setattr(module, k, _Recorder(v, sink))
        launcher(*args, **kwargs)
    finally:
        for k, v in saved.items():
            setattr(module, k, v)
    return sink


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def choice_launches(S: int, dtype: torch.dtype, rank_dtype: torch.dtype, B: int = CHOICE_B) -> list[Launch]:
    """Launches of the four choice launchers for contiguous ``[B, S]`` inputs, as ``reduction="mean"`` makes them."""
    r, k, w = _meta(B, S, dtype=dtype), _meta(B, S, dtype=rank_dtype), _meta(B, dtype=dtype)
    g = _meta(1, dtype=dtype).expand(B)  # the upstream gradient of a mean: one value, stride 0
    calls = [
        (mnl_kernels, mnl_kernels.mnl_topk_fwd, (r, k)),
        (mnl_kernels, mnl_kernels.mnl_topk_bwd, (g, r, k)),
        (mallows_kernels, mallows_kernels.mallows_rmj_topk_fwd, (r, k, w)),
        (mallows_kernels, mallows_kernels.mallows_rmj_topk_bwd, (g, r, k, w)),
    ]
    meta = {"S": S, "dtype": _name(dtype), "ranks": _name(rank_dtype)}
    config = f"S={S} {_name(dtype)} {_name(rank_dtype)}"
    return [Launch(*rec, meta=meta, config=config) for m, f, a in calls for rec in record(m, f, *a)]


def token_launches(dtype: torch.dtype, V: int, N: int = TOKEN_N) -> list[Launch]:
    """Launches of the token-stats forward and backward launchers for contiguous ``[N, V]`` logits."""
    z, t = _meta(N, V, dtype=dtype), _meta(N, dtype=torch.int64)
    out = token_kernels.out_dtype(dtype)
    lse, ent, g1, g2 = (_meta(N, dtype=out) for _ in range(4))
    capped = {"softcap": 30.0, "logit_scale": 0.5, "temperature": 0.7}  # Gemma-2's cap: the TRANSFORM=2 kernels
    calls = [
        ("", token_kernels.token_stats_forward, (z, t, -100), {}),
        ("", token_kernels.token_stats_backward, (z, t, lse, ent, g1, g2, -100), {}),
        (" softcap", token_kernels.token_stats_forward, (z, t, -100), capped),
        (" softcap", token_kernels.token_stats_backward, (z, t, lse, ent, g1, g2, -100), {**capped, "g_lse": g2}),
    ]
    meta = {"V": V, "dtype": _name(dtype)}
    return [
        Launch(*rec, meta=meta, config=f"V={V} {_name(dtype)}{label}")
        for label, f, a, kw in calls
        for rec in record(token_kernels, f, *a, **kw)
    ]


@functools.lru_cache
def launches(full: bool = False) -> list[Launch]:
    """Every launch of the grid (``full``) or of the reduced default set."""
    out = []
    for S in CHOICE_S:
        for dt in CHOICE_DTYPES:
            for kt in RANK_DTYPES:
                if full or (S, dt, kt) in REDUCED_CHOICE:
                    out += choice_launches(S, dt, kt)
    for dt in TOKEN_DTYPES:
        for V in TOKEN_V:
            if full or (dt, V) in REDUCED_TOKEN:
                out += token_launches(dt, V)
    return out


# --- compile and inspect --------------------------------------------------------------------


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def available(target: str) -> bool:
    """Whether this Triton has the toolchain for ``target`` (ptxas and cuobjdump, or the AMD backend)."""
    if TARGETS[target].backend == "cuda":
        ptxas = "ptxas-blackwell" if TARGETS[target].arch >= 100 else "ptxas"
        return all(os.path.exists(_tool(t)) for t in (ptxas, "cuobjdump"))
    try:
        make_backend(TARGETS[target])
    except Exception:
        return False
    return True


def _sass(cubin: str) -> str:
    return subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout


def specialize(fn: JITFunction, target: GPUTarget, args: tuple, kwargs: dict):
    """``(signature, constexprs, attrs, options)`` exactly as ``fn[grid](*args, **kwargs)`` would compile."""
    backend = make_backend(target)
    if target.backend == "hip":  # NVIDIA-only options, which the launchers pass on CUDA builds of torch only
        kwargs = {k: v for k, v in kwargs.items() if k != "maxnreg"}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, opts)
    return signature, constexprs, attrs, options


_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+([^;]*);", re.M)
_REG = re.compile(r"%\w+")


def ptx_access_widths(ptx: str, pointer_names: list[str]) -> dict[str, dict[str, list[int]]]:
    """``{pointer argument: {"ld": [bits...], "st": [bits...]}}`` of every global load and store in ``ptx``.

    Each access's address register is traced back through its definitions to the
    ``ld.param`` of a kernel parameter (``pointer_names`` are the PTX parameters in order).
    """
    defs: dict[str, set[str]] = {}
    params: dict[str, int] = {}
    accesses = []
    for op, operands in _INSTR.findall(ptx):
        regs = _REG.findall(operands)
        if op.startswith(("ld.global", "st.global")):
            addr = re.search(r"\[\s*(%\w+)", operands)
            lanes = re.search(r"\.v(\d)", op)
            bits = re.findall(r"\.[bsuf](\d+)", op)
            if addr and bits:
                accesses.append((op[:2], addr.group(1), int(lanes.group(1) if lanes else 1) * int(bits[-1])))
            if op.startswith("st."):
                continue
        if not regs:
            continue
        if op.startswith("ld.param"):
            m = re.search(r"_param_(\d+)\]", operands)
            if m:
                params[regs[0]] = int(m.group(1))
                continue
        defs.setdefault(regs[0], set()).update(regs[1:])
    out: dict[str, dict[str, list[int]]] = {}
    for kind, reg, bits in accesses:
        seen, todo, found = set(), [reg], set()
        while todo:
            r = todo.pop()
            if r in seen:
                continue
            seen.add(r)
            if r in params:
                found.add(params[r])
            todo += defs.get(r, ())
        names = sorted(pointer_names[i] for i in found if i < len(pointer_names) and pointer_names[i])
        key = "+".join(names) or "?"
        out.setdefault(key, {"ld": [], "st": []})[kind].append(bits)
    return out


def amd_access_widths(amdgcn: str) -> dict[str, list[int]]:
    """Widths in bits of the global/buffer loads and stores of an AMD kernel (not attributed)."""
    size = {"byte": 8, "short": 16, "ubyte": 8, "ushort": 16, "sbyte": 8, "sshort": 16, "dword": 32}
    out = {"ld": [], "st": []}
    for kind, width in re.findall(r"(?:global|buffer)_(load|store)_(d16_\w+|\w+)", amdgcn):
        m = re.match(r"dwordx(\d)", width)
        bits = 32 * int(m.group(1)) if m else size.get(width, 16 if width.startswith("d16") else 0)
        out["ld" if kind == "load" else "st"].append(bits)
    return out


def occupancy(target: str, regs: int, shared: int, num_warps: int) -> tuple[int, str]:
    """Theoretical resident warps per SM and the resource that limits them (CUDA occupancy calculator)."""
    max_regs, max_smem, max_warps, max_blocks = SM_LIMITS[target]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {
        "registers": (max_regs // regs_per_warp) // num_warps,
        "shared memory": max_smem // (shared + 1024),
        "warps": max_warps // num_warps,
        "blocks": max_blocks,
    }
    limiter = min(limits, key=lambda k: (limits[k], k != "warps"))
    return limits[limiter] * num_warps, limiter


def launch_name(launch: Launch) -> str:
    """What the report calls a launch: its kernel's name, with ``_fwd`` or ``_bwd`` where one kernel body
    does both passes (its ``BACKWARD`` constexpr)."""
    fn = launch.fn
    name = fn.fn.__name__.removesuffix("_kernel").lstrip("_")
    bound = {**dict(zip(fn.arg_names, launch.args, strict=False)), **launch.kwargs}
    if "BACKWARD" in bound:
        name += "_bwd" if bound["BACKWARD"] else "_fwd"
    return name


def compile_one(launch: Launch, target: str) -> dict:
    """Compile ``launch`` for ``target``; a dict of what the compiler reports (``error`` set on failure)."""
    fn = launch.fn
    res = {"kernel": fn.fn.__name__, "name": launch_name(launch), "config": launch.config, "target": target}
    res.update(launch.meta)
    try:
        sig, constexprs, attrs, options = specialize(fn, TARGETS[target], launch.args, launch.kwargs)
        res["num_warps"] = options.num_warps
        res["constexprs"] = {fn.arg_names[k[0]]: str(v) for k, v in constexprs.items()}
        res["divisible_16"] = sorted(fn.arg_names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v)
        ck = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGETS[target], options=options.__dict__)
    except Exception as e:  # reported, asserted by the test
        res["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        return res
    res["shared"] = ck.metadata.shared
    if TARGETS[target].backend == "cuda":
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
            ).stdout
            info = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
            # Local memory in use: count the spill instructions themselves (STL/LDL) in the SASS.
            sass = "" if info["STACK"] + info["LOCAL"] == 0 else _sass(f.name)
        res["regs"] = info["REG"]
        res["stack_bytes"] = info["STACK"] + info["LOCAL"]
        res["spills"] = len(re.findall(r"\b(?:STL|LDL)\b", sass))
        res["warps_per_sm"], res["limiter"] = occupancy(target, res["regs"], res["shared"], res["num_warps"])
        ptx_params = [n if sig[n].startswith("*") else "" for n in fn.arg_names if sig[n] != "constexpr"]
        res["access"] = ptx_access_widths(ck.asm["ptx"], ptx_params)
    else:
        asm = ck.asm["amdgcn"]
        counts = {k: int(v) for k, v in re.findall(r"\.(vgpr_count|vgpr_spill_count|sgpr_spill_count):\s+(\d+)", asm)}
        res["regs"] = counts.get("vgpr_count", -1)
        res["spills"] = counts.get("vgpr_spill_count", 0) + counts.get("sgpr_spill_count", 0)
        res["access"] = {"*": amd_access_widths(asm)}
    return res


def _work(item):
    launch_index, target, full = item
    return compile_one(launches(full)[launch_index], target)


#: Exit status when this Triton lacks the binder API used here (written against Triton 3.8).
UNSUPPORTED_TRITON = 3


def run(full: bool = False, targets: list[str] | None = None, jobs: int = 1) -> dict:
    """Compile the grid for ``targets`` (default: all with a toolchain). ``{"results": [...], "skipped": [...]}``."""
    if not hasattr(JITFunction, "_pack_args"):
        print(f"compile_static: Triton {triton.__version__} has no JITFunction._pack_args", file=sys.stderr)
        raise SystemExit(UNSUPPORTED_TRITON)
    targets = targets or list(TARGETS)
    skipped = [t for t in targets if not available(t)]
    items = [(i, t, full) for t in targets if t not in skipped for i in range(len(launches(full)))]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_work, items, chunksize=4))
    else:
        results = [_work(it) for it in items]
    return {"triton": triton.__version__, "full": full, "results": results, "skipped": skipped}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", default=os.environ.get("RCPO_GPU_COMPILE_FULL") == "1")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    out = run(a.full, a.targets.split(","), a.jobs)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
