"""Deprecated: moved to :mod:`rcpo_losses.training.data` (this path works for one release)."""

from .moved import moved

moved("rcpo_losses.data", "rcpo_losses.training.data")
