"""The ranked step of a model loaded with a kernel that takes no mask: padded with it, or prefix-shared switched.

Run (not collected by the normal test run):

    python -m pytest benchmarks/bench_user_kernel.py --benchmark-json=out.json

``bench_ranked_step.py``'s step, batch and model (4 layers, hidden 512, vocab 32000, bf16),
loaded with ``attn_implementation = RCPO_BENCH_USER_ATTN`` (default ``flash_attention_2``).
Rows:

- ``padded-user_kernel``: ``layout="padded"`` keeps the user's kernel (what ``RCPOTrainer``
  did with ``flash_attention_2`` before it switched it); skipped when transformers cannot
  load that kernel (``flash_attn`` not installed);
- ``prefix_shared-switched``: ``RCPOTrainer``'s prefix-shared step, the models switched
  around it to :func:`rcpo_losses.training.model_stats.mask_attention_implementation`
  (``flex_attention`` with a ``BlockMask`` on CUDA, ``sdpa`` on the CPU), the switch and
  its restore timed in the step.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ranked_step as ranked  # noqa: E402
from common import DEVICE, sync  # noqa: E402

from rcpo_losses.training.model_stats import attention_implementation, mask_attention_implementation  # noqa: E402

USER_ATTN = os.environ.get("RCPO_BENCH_USER_ATTN", "flash_attention_2")
ROWS = ("padded-user_kernel", "prefix_shared-switched")


@pytest.fixture(scope="module")
def policy_ref():
    pytest.importorskip("transformers")
    return ranked.models()


@pytest.mark.parametrize("row", ROWS)
def test_user_kernel_step(benchmark, policy_ref, row):
    policy, ref = policy_ref
    layout = row.split("-")[0]
    for m in (policy, ref):
        try:
            m.set_attn_implementation(USER_ATTN)
        except (ImportError, ValueError) as e:  # flash_attn missing: the padded row cannot run it
            if layout == "padded":
                pytest.skip(f"{USER_ATTN} unavailable: {e}")
            m.config._attn_implementation = USER_ATTN  # as loaded with it; the step switches it anyway
    batch = ranked.make_batch("ranked", layout)

    def run():
        with contextlib.ExitStack() as stack:
            if layout == "prefix_shared":
                for m in (policy, ref):
                    stack.enter_context(attention_implementation(m, mask_attention_implementation(m)))
            out = ranked.step(policy, ref, batch, "ranked", layout)
        sync()
        return out

    run()  # warm-up (FlexAttention compiles on CUDA)
    assert policy.config._attn_implementation == USER_ATTN  # restored after the step
    benchmark.group = f"ranked step, model loaded with {USER_ATTN}, B={ranked.NUM_PROMPTS}"
    benchmark.pedantic(run, rounds=ranked.ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        layout=layout,
        attention=USER_ATTN if layout == "padded" else mask_attention_implementation(policy),
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu {torch.backends.cpu.get_cpu_capability()}",
        **ranked.token_counts(batch, layout),
    )
