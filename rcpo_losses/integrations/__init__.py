"""Integrations with training frameworks; each submodule imports its framework, this package does not.

- :mod:`rcpo_losses.integrations.transformers`: ``RCPOTrainer``, a ``transformers.Trainer``
  subclass (``pip install "rcpo-losses[examples]"``).
"""
