"""Deprecated: moved to :mod:`rcpo_losses.training.precompute` (this path works for one release)."""

from .moved import moved

moved("rcpo_losses.precompute", "rcpo_losses.training.precompute")
