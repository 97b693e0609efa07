"""rcpo_losses.versions: the version order, require()'s error, and the floors as pyproject.toml declares them."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rcpo_losses import versions
from rcpo_losses.versions import FLOORS, at_least, require, version_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("2.13.0+cpu", "2.13.0", 0),  # the local label is ignored
        ("2.13.0+cu130", "2.13.0+cpu", 0),
        ("5.6", "5.6.0", 0),
        ("5.25.0", "5.24.0", 1),
        ("10.0", "9.9", 1),  # numbers, not strings
        ("5.6.0", "5.10.1", -1),
        ("4.57.0.dev0", "4.57.0", -1),
        ("4.57.0.dev0", "4.56.2", 1),
        ("4.57.0.dev0", "4.57.0a0", -1),
        ("4.57.0a1", "4.57.0b0", -1),
        ("4.57.0b2", "4.57.0rc1", -1),
        ("4.57.0rc1", "4.57.0", -1),
        ("4.57.0", "4.57.0.post1", -1),
        ("4.57.0.post1.dev0", "4.57.0.post1", -1),
        ("4.57.0.post1.dev0", "4.57.0", 1),
        ("4.57.0a1.dev0", "4.57.0a1", -1),
        ("2.14.0.dev20261201+cpu", "2.13.0", 1),
        ("1.0-1", "1.0.post1", 0),
        ("1.0RC1", "1.0rc1", 0),
        ("1.0.alpha.2", "1.0a2", 0),
        ("v1.2", "1.2", 0),
        ("1!0.1", "9.0", 1),  # the epoch first
    ],
)
def test_version_order(a, b, order):
    ka, kb = version_key(a), version_key(b)
    assert (ka > kb) - (ka < kb) == order
    assert at_least(a, b) == (order >= 0)


@pytest.mark.parametrize("text", ["", "abc", "1.0-", "latest", "1..0", "1.0+", "2.13.0 cpu"])
def test_not_a_version(text):
    with pytest.raises(ValueError, match="not a version"):
        version_key(text)


def _version(parts):
    release, pre, post, dev, local = parts
    text = ".".join(map(str, release))
    if pre is not None:
        text += f"{pre[0]}{pre[1]}"
    if post is not None:
        text += f".post{post}"
    if dev is not None:
        text += f".dev{dev}"
    if local is not None:
        text += f"+{local}"
    return text


versions_text = st.tuples(
    st.lists(st.integers(0, 12), min_size=1, max_size=4),
    st.none() | st.tuples(st.sampled_from(["a", "b", "rc", "alpha", "beta", "c", "RC"]), st.integers(0, 3)),
    st.none() | st.integers(0, 3),
    st.none() | st.integers(0, 3),
    st.none() | st.sampled_from(["cpu", "cu130", "rocm6.4"]),
).map(_version)


@given(versions_text, versions_text)
def test_the_order_is_packagings(a, b):
    """The same order as ``packaging.version.Version`` (local labels aside, which ``>=`` ignores)."""
    Version = pytest.importorskip("packaging.version").Version
    va, vb = Version(a).public, Version(b).public
    ka, kb = version_key(a), version_key(b)
    assert ((ka > kb) - (ka < kb)) == ((Version(va) > Version(vb)) - (Version(va) < Version(vb))), (a, b)


def _installed(found: dict[str, str]):
    def version(name):
        if name not in found:
            raise metadata.PackageNotFoundError(name)
        return found[name]

    return version


def test_require_names_both_versions(monkeypatch):
    monkeypatch.setattr(versions.metadata, "version", _installed({"transformers": "5.5.4"}))
    with pytest.raises(ImportError) as info:
        require("transformers", "5.6.0")
    assert str(info.value) == (
        "rcpo_losses needs transformers>=5.6.0; transformers 5.5.4 is installed: pip install -U 'transformers>=5.6.0'"
    )


def test_require_reads_the_floor(monkeypatch):
    monkeypatch.setattr(versions.metadata, "version", _installed({"torch": "2.5.1+cpu"}))
    with pytest.raises(ImportError, match=re.escape(f"needs torch>={FLOORS['torch']}; torch 2.5.1+cpu is installed")):
        require("torch")


@pytest.mark.parametrize("installed", ["5.6.0", "5.6.0+local", "5.25.0", "6.0.0.dev0", "not-a-version"])
def test_require_passes(monkeypatch, installed):
    monkeypatch.setattr(versions.metadata, "version", _installed({"transformers": installed}))
    require("transformers", "5.6.0")


def test_require_passes_a_package_that_is_not_installed(monkeypatch):
    monkeypatch.setattr(versions.metadata, "version", _installed({}))
    require("peft")


def test_floors_are_pyprojects():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["examples"]]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement)
        if m:
            declared[m[1]] = m[2]
    assert {name: declared.get(name) for name in FLOORS} == FLOORS


def test_the_script_prints_the_pins():
    """``python rcpo_losses/versions.py``, as ``.ci/floors`` runs it (no torch: the standard library only)."""
    out = subprocess.run([sys.executable, "rcpo_losses/versions.py"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{name}=={version}" for name, version in FLOORS.items()]


# Run in a fresh interpreter whose importlib.metadata reports an old version of one distribution.
_OLD = """
import sys
from importlib import metadata
real = metadata.version
metadata.version = lambda name: {old!r} if name == {name!r} else real(name)
try:
    import {module}
except ImportError as e:
    print(e)
    print({name!r} in sys.modules)
"""


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("torch", "rcpo_losses"),
        ("transformers", "rcpo_losses.training.trainer"),
        ("accelerate", "rcpo_losses.training.trainer"),
        ("peft", "rcpo_losses.training.trainer"),
        ("transformers", "rcpo_losses.training.online"),
    ],
)
def test_an_old_release_fails_at_import_before_it_is_imported(name, module):
    if name != "torch":
        pytest.importorskip("transformers")
    code = _OLD.format(old="0.1.0", name=name, module=module)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    need = FLOORS[name]
    assert out.stdout.splitlines() == [
        f"rcpo_losses needs {name}>={need}; {name} 0.1.0 is installed: pip install -U '{name}>={need}'",
        "False",  # raised before the package was imported
    ]
