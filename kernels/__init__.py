"""Triton kernels of rcpo_losses, shipped as ``rcpo_losses.kernels``.

Each kernel has a plain PyTorch twin in ``rcpo_losses`` that is its specification and
the CPU path. Importing this package imports Triton; ``rcpo_losses`` only does so when a
Triton path is taken.
"""
