"""Every Python code block in README.md and docs/*.md runs, so the docs cannot rot.

The blocks of one file run in order in one namespace, like a notebook.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


# Packages a block may import that a GPU image lacks (docs/benchmarks.md): without one, the
# file's remaining blocks are skipped, with the reason. CI installs them all.
OPTIONAL = {"datasets", "gguf", "trl", "cut_cross_entropy", "liger_kernel"}


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def run_blocks(path: Path) -> None:
    """Run the Python blocks of ``path`` in order in one namespace; skip the rest at a missing optional package."""
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in OPTIONAL:
                pytest.skip(f"{path.name}, code block {i} and after: needs {e.name}, which is not installed")
            raise AssertionError(f"{path.name}, code block {i} failed: {e!r}\n{code}") from e
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.name}, code block {i} failed: {e!r}\n{code}") from e


@pytest.mark.parametrize("path", [p for p in FILES if blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_blocks(path)


def test_a_block_without_an_optional_package_is_skipped_with_the_reason(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text("```python\nx = 1\n```\n\n```python\nimport rcpo_absent_optional\n```\n")
    monkeypatch.setattr(f"{__name__}.OPTIONAL", {"rcpo_absent_optional"})
    with pytest.raises(pytest.skip.Exception, match="doc.md, code block 1 and after: needs rcpo_absent_optional"):
        run_blocks(doc)
    doc.write_text("```python\nimport rcpo_absent_required\n```\n")
    with pytest.raises(AssertionError, match="doc.md, code block 0 failed"):
        run_blocks(doc)


def test_every_doc_is_linked_from_the_index_or_readme():
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "index.md").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "index.md" and p.name not in text]
    assert not missing, f"docs not linked from README.md or docs/index.md: {missing}"


def _resolves(dotted: str) -> bool:
    """``rcpo_losses.a.b.c``: a module, or an attribute of the longest importable prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_dotted_name_in_the_docs_resolves():
    """``rcpo_losses.x.y`` in README.md, docs/ and the docstrings of examples/ names something that exists."""
    pytest.importorskip("transformers")  # rcpo_losses.integrations.transformers
    texts = [p.read_text() for p in FILES] + [p.read_text() for p in sorted((ROOT / "examples").glob("*.py"))]
    names = {m.rstrip(".") for t in texts for m in re.findall(r"\brcpo_losses(?:\.\w+)+", t)}
    names = {n for n in names if not n.startswith("rcpo_losses.kernels")}  # import triton; checked by the GPU tests
    assert len(names) > 20
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"documented names that do not exist: {missing}"
