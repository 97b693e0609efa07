"""The PyTorch twins of the Triton kernels: one module per kernel file, the specification it is tested against.

- :mod:`~rcpo_losses.reference.mnl` is the twin of ``kernels/rcpo_kernels/mnl.py`` (MNL top-k NLL, eq. 8);
- :mod:`~rcpo_losses.reference.mallows` of ``kernels/rcpo_kernels/mallows.py`` (smoothed Mallows-RMJ, eq. 12);
- :mod:`~rcpo_losses.reference.token_stats` of ``kernels/rcpo_kernels/token_stats.py`` (per-token log-prob and entropy).

They are plain PyTorch and serve three callers: the CPU path (the ops in :mod:`rcpo_losses.ops`
take them wherever the kernel does not run), the second derivative of the kernels' custom ops,
and the tests. They import only the core (inputs, ranks, checks), never an op or a kernel.
"""
