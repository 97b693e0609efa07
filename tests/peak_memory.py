"""Peak memory of a piece of code on the CPU, measured in a fresh subprocess.

The CPU has no caching allocator, and glibc keeps freed blocks for reuse, so the resident
set of a long-lived process says little about live tensors. ``run`` therefore executes a
script in a fresh interpreter with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves
every block above 64 KiB with its own mmap and returns it on free, so the resident set
tracks live tensors. The script gets two helpers:

- ``start()``: reset the peak (``VmHWM``, via ``/proc/self/clear_refs``) to the current
  resident set and return that resident set in bytes (call it after building the inputs);
- ``peak()``: the peak resident set since ``start()``, in bytes (``ru_maxrss`` where the
  reset is not allowed, which then includes the set-up).

and must print one JSON object as its last line of output; ``run`` returns it parsed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# Linux only: reads /proc and relies on glibc malloc.
SUPPORTED = sys.platform.startswith("linux")

_PRELUDE = textwrap.dedent(
    """
    import json, resource, sys

    def _status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    _RESET = [False]

    def start():
        base = _status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current resident set
            _RESET[0] = True
        except OSError:
            _RESET[0] = False
        return base

    def peak():
        if _RESET[0]:
            return _status("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    """
)


def run(script: str, *argv: object, timeout: float = 120, threads: int = 2) -> dict:
    """Run ``script`` (with ``start``/``peak`` defined) in a fresh interpreter; its last stdout line as JSON."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    code = _PRELUDE + textwrap.dedent(script)
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
