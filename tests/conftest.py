import os

# The CPU tile step of the fused LM head runs compiled by default where a C++ compiler is found
# (rcpo_losses.ops.backend.CPU_COMPILE). Each new dtype or transform is a compile of seconds, so
# the suite (and the processes it spawns, through the environment) runs the eager twin, and
# tests/test_fused_linear_compiled.py turns compilation on and compares the two.
# RCPO_LOSSES_CPU_COMPILE=1 runs the whole suite compiled.
os.environ.setdefault("RCPO_LOSSES_CPU_COMPILE", "0")

import torch  # does not import triton

# The Triton interpreter must be on before triton is first imported: with no GPU, the
# kernels run on CPU tensors under it. With CUDA the kernels run compiled, on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
