"""Old dotted paths of modules that moved into ``rcpo_losses.training``: they work for one release.

Each old module is a two-line file that calls :func:`moved`; the old name then is the new module
(``sys.modules`` maps both names to one object), so attributes, monkeypatching and ``isinstance``
checks agree under either name.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType


def moved(old: str, new: str, stacklevel: int = 3) -> ModuleType:
    """Warn that ``old`` is deprecated in favour of ``new``, and make ``old`` an alias of ``new``."""
    # stacklevel 3: past this function and the old module's body; the import machinery's own frames
    # are skipped by `warnings`, so the warning points at the user's import line (and is shown there).
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import {new} instead",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
