"""What a user gets from the repository root and from the wheel.

The root's ``kernels/`` folder must never be importable as a top-level package ``kernels``: that name
belongs to Hugging Face's ``kernels`` distribution, which transformers imports, and the root is first on
``sys.path`` under ``python -m pytest``, ``python -m rcpo_losses.<module>`` and ``python -c``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("choice_common", "mallows", "mnl", "token_stats")


def _python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _installed_kernels(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The file of the installed ``kernels`` package seen from outside the repository, and the
    environment to run with; where none is installed, a stand-in package in a temporary site dir."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s and s.origin else '')"
    origin = _python(where, cwd=tmp_path, env=env)
    if not origin:
        site = tmp_path / "site"
        (site / "kernels").mkdir(parents=True)
        (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
        env["PYTHONPATH"] = str(site)
        origin = str(site / "kernels" / "__init__.py")
    return origin, env


def test_import_kernels_from_the_root_gives_the_installed_distribution(tmp_path):
    origin, env = _installed_kernels(tmp_path)
    seen = _python("import kernels; print(kernels.__file__)", cwd=ROOT, env=env)
    assert Path(seen).resolve() == Path(origin).resolve(), f"the repository's {seen} shadows {origin}"


def test_transformers_trainer_imports_from_the_root(tmp_path):
    pytest.importorskip("transformers")
    _, env = _installed_kernels(tmp_path)
    assert _python("from transformers import Trainer; print(Trainer.__name__)", cwd=ROOT, env=env) == "Trainer"


def test_every_kernel_module_imports_as_rcpo_losses_kernels():
    pytest.importorskip("triton")
    code = "; ".join(f"import rcpo_losses.kernels.{m}" for m in KERNEL_MODULES)
    _python(code + "; print('ok')", cwd=ROOT)


def test_the_wheel_ships_the_kernels_inside_the_package_and_no_top_level_kernels(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("rcpo_losses-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for m in KERNEL_MODULES:
        assert f"rcpo_losses/kernels/{m}.py" in names
    assert "rcpo_losses/kernels/__init__.py" in names
    top = {n.split("/")[0] for n in names}
    assert not any(t in {"kernels", "rcpo_kernels"} for t in top), sorted(top)
