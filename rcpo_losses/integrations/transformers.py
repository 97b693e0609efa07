"""Deprecated: moved to :mod:`rcpo_losses.training.trainer` (this path works for one release)."""

from ..moved import moved

moved("rcpo_losses.integrations.transformers", "rcpo_losses.training.trainer")
