"""The oldest releases of torch and of the libraries of the ``examples`` extra that rcpo_losses runs with.

:data:`FLOORS` is the one place they are written in the code: ``pyproject.toml`` declares the same
floors (``tests/test_versions.py`` checks that they agree), and ``bash .ci/floors`` installs exactly
these versions in a fresh virtual environment and runs the whole test suite with them (docs/index.md,
"Supported versions"). :func:`require` checks an installed distribution against its floor where
rcpo_losses first imports it, so that an older release fails at import, naming both versions, rather
than deep inside a model's forward. Standard library only: ``packaging`` is not a dependency, so the
versions are compared by :func:`version_key`.

``python rcpo_losses/versions.py`` prints the floors as pip requirements (``torch==2.13.0 ...``).
"""

from __future__ import annotations

import re
from importlib import metadata

#: The oldest release of each distribution with which the whole test suite passes (``.ci/floors``).
FLOORS = {
    "torch": "2.13.0",
    "transformers": "5.6.0",
    "accelerate": "1.10.1",
    "peft": "0.18.0",
    "datasets": "4.8.0",
    "tokenizers": "0.22.1",
}

# PEP 440, the parts compared here: epoch, release, pre-release, post-release, development release.
# The local label (torch's "+cpu", "+cu130") is accepted and ignored, as ">=" ignores it.
_VERSION = re.compile(
    r"""
    v?(?:(?P<epoch>\d+)!)?
    (?P<release>\d+(?:\.\d+)*)
    (?:[-_.]?(?P<pre_label>alpha|beta|preview|pre|rc|a|b|c)[-_.]?(?P<pre>\d*))?
    (?:-(?P<post_implicit>\d+)|[-_.]?(?:post|rev|r)[-_.]?(?P<post>\d*))?
    (?:[-_.]?dev[-_.]?(?P<dev>\d*))?
    (?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?
    """,
    re.VERBOSE | re.IGNORECASE,
)
_PRE = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def version_key(version: str) -> tuple:
    """A key that orders version strings as PEP 440 does (``packaging.version.Version`` without ``packaging``).

    ``"2.13.0+cpu"`` equals ``"2.13.0"`` (the local label is ignored); ``"4.57.0.dev0"`` <
    ``"4.57.0rc1"`` < ``"4.57.0"`` < ``"4.57.0.post1"``; ``"5.6"`` equals ``"5.6.0"``. Raises
    ``ValueError`` for a string that is not a version.
    """
    m = _VERSION.fullmatch(version.strip())
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    release = [int(part) for part in m["release"].split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    if m["pre_label"] is not None:
        pre = (_PRE[m["pre_label"].lower()], int(m["pre"] or 0))
    elif m["dev"] is not None and m["post"] is None and m["post_implicit"] is None:
        pre = (-1, 0)  # 1.0.dev0 comes before 1.0a0
    else:
        pre = (3, 0)  # a final release comes after its pre-releases
    post_number = m["post_implicit"] if m["post_implicit"] is not None else m["post"]
    post = -1 if post_number is None else int(post_number or 0)
    dev = (1, 0) if m["dev"] is None else (0, int(m["dev"] or 0))  # a .devN comes before what it precedes
    return int(m["epoch"] or 0), tuple(release), pre, post, dev


def at_least(version: str, minimum: str) -> bool:
    """Whether ``version >= minimum`` in PEP 440's order (:func:`version_key`)."""
    return version_key(version) >= version_key(minimum)


def require(package: str, minimum: str | None = None) -> None:
    """Raise ``ImportError`` if the installed distribution ``package`` is older than ``minimum``.

    Args:
        package: the distribution's name (``"torch"``, ``"transformers"``).
        minimum: the oldest version accepted; default ``FLOORS[package]``.

    A distribution that is not installed passes (importing it raises its own error), as does one
    whose version string cannot be read as a version.
    """
    minimum = FLOORS[package] if minimum is None else minimum
    try:
        installed = metadata.version(package)
    except metadata.PackageNotFoundError:
        return
    try:
        ok = at_least(installed, minimum)
    except ValueError:
        return
    if not ok:
        raise ImportError(
            f"rcpo_losses needs {package}>={minimum}; {package} {installed} is installed: "
            f"pip install -U '{package}>={minimum}'"
        )


if __name__ == "__main__":
    print(" ".join(f"{name}=={version}" for name, version in FLOORS.items()))
