"""Deprecated: ``rcpo_losses.integrations.transformers`` moved to :mod:`rcpo_losses.training.trainer`.

The old path works for one release, with a ``DeprecationWarning``.
"""
