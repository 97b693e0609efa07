"""Deprecated: moved to :mod:`rcpo_losses.training.generate` (this path and its CLI work for one release)."""

from .moved import moved

if __name__ == "__main__":  # python -m rcpo_losses.generate: the warning points here, where it is shown
    moved("rcpo_losses.generate", "rcpo_losses.training.generate", stacklevel=2).main()
else:
    moved("rcpo_losses.generate", "rcpo_losses.training.generate")
