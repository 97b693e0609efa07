"""Triton kernels of rcpo_losses, shipped as ``rcpo_losses.kernels``.

Each kernel file has a plain PyTorch twin in ``rcpo_losses.reference`` (same file name) that
is its specification and the CPU path; the ops of ``rcpo_losses.ops`` register the kernels as
custom ops and choose between the two. ``choice_common`` holds the helpers the two choice
kernels share (tiles, masks, launch). Importing this package imports Triton; ``rcpo_losses``
only does so when a Triton path is taken.
"""
