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


_MISSING = object()


def _lookup(dotted: str):
    """``rcpo_losses.a.b.c``: a module, or an attribute of the longest importable prefix; ``_MISSING`` if none."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def _resolves(dotted: str) -> bool:
    return _lookup(dotted) is not _MISSING


def test_every_dotted_name_in_the_docs_resolves():
    """``rcpo_losses.x.y`` in README.md, docs/ and the docstrings of examples/ names something that exists."""
    pytest.importorskip("transformers")  # rcpo_losses.training.trainer
    texts = [p.read_text() for p in FILES] + [p.read_text() for p in sorted((ROOT / "examples").glob("*.py"))]
    names = {m.rstrip(".") for t in texts for m in re.findall(r"\brcpo_losses(?:\.\w+)+", t)}
    names = {n for n in names if not n.startswith("rcpo_losses.kernels")}  # import triton; checked by the GPU tests
    assert len(names) > 20
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"documented names that do not exist: {missing}"


# `name(args)` in README.md and docs/*.md, outside code blocks (which run): a signature, or a call.
SIGNATURE = re.compile(r"`((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(([^`]*?)\)(\s*->[^`]*)?`", re.S)
# What such a `name(...)` may name outside rcpo_losses: other libraries, variables, math.
OUTSIDE = {
    "torch",
    "tl",
    "trl",
    "liger_kernel",
    "cut_cross_entropy",
    "datasets",
    "model",
    "accelerator",
    "spec",
    "logp",
    "exp",
    "log",
    "log1p",
    "sigma",
    "sigmoid",
    "softmax",
    "log_softmax",
    "O",
    "P",
    "p",
    "k",
    "min",
    "max",
    "ceil",
    "addmm",
    "next_pow2",
    "get_cpu_capability",
    "GPUTarget",
    "evaluate",
    "predict",
    "__call__",
    "TrainingArguments",
    "LlamaConfig",
    "MistralConfig",
    # callables a user writes for rank_completions (reward=, generate=), and vLLM's LLM
    "reward",
    "generate",
    "llm",
}


def _library_object(dotted: str):
    """What ``dotted`` names in rcpo_losses (a dotted path, or a name in one of its modules), or ``_MISSING``."""
    import importlib
    import pkgutil

    import rcpo_losses

    if dotted.startswith("rcpo_losses."):
        return _lookup(dotted)
    names = [m.name for m in pkgutil.walk_packages(rcpo_losses.__path__, "rcpo_losses.")]
    for module in ["rcpo_losses", *(n for n in names if not n.startswith("rcpo_losses.kernels"))]:
        importlib.import_module(module)
        obj = _lookup(f"{module}.{dotted}")
        if obj is not _MISSING:
            return obj
    return _MISSING


def _split_arguments(text: str) -> list[str]:
    """The comma-separated items of an argument list, commas inside brackets and quotes left alone."""
    items, depth, quote, current = [], 0, None, ""
    for ch in " ".join(text.split()):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += ch
    return [item for item in [*items, current.strip()] if item]


def _default_matches(text: str, default) -> bool:
    import ast

    try:
        return ast.literal_eval(text) == default
    except (ValueError, SyntaxError):
        return text == getattr(default, "__name__", repr(default))


def _signature_problems(name: str, arguments: str, signature_style: bool) -> list[str]:
    import inspect

    if name.split(".")[0] in OUTSIDE:
        return []
    obj = _library_object(name)
    if obj is _MISSING:
        return [f"{name}: not in rcpo_losses"]
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return [f"{name}: documented with arguments but not callable"]
    params = list(signature.parameters.values())
    if params and params[0].name == "self":  # a method documented as Class.method(...)
        params, signature = params[1:], signature.replace(parameters=params[1:])
    items = _split_arguments(arguments)
    if "..." in items:
        return []
    if not signature_style:  # a call: it must bind
        positional = [i for i in items if "=" not in i.replace("==", "")]
        keywords = {i.split("=")[0].strip(): None for i in items if i not in positional}
        try:
            signature.bind_partial(*positional, **keywords)
        except TypeError as e:
            return [f"{name}({arguments}): {e}"]
        return []
    want = []  # the real signature, spelled as the docs spell one
    for p in params:
        if p.kind is p.KEYWORD_ONLY and "*" not in want and not any(w.startswith("*") for w in want):
            want.append("*")
        star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        default = getattr(p.default, "__name__", repr(p.default))  # a function default by its name
        want.append(star + p.name if p.default is p.empty else f"{p.name}={default}")
    got = [i.split("=")[0].strip() + ("=" if "=" in i else "") for i in items]
    real = [w.split("=")[0] + ("=" if "=" in w else "") for w in want]
    if got != real:
        return [f"{name}({arguments}): the real signature is ({', '.join(want)})"]
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    return [
        f"{name}: documented {item}, the default is {defaults[key]!r}"
        for item in items
        if "=" in item
        for key, text in [map(str.strip, item.split("=", 1))]
        if not _default_matches(text, defaults[key])
    ]


def test_every_documented_signature_is_real():
    """``f(a, *, b=1)`` in the docs is f's signature (names, order, keyword-only marker, defaults); ``f(x, b=2)``,
    a call, binds to it; and f is in rcpo_losses (or named in OUTSIDE)."""
    pytest.importorskip("transformers")
    problems, seen = [], 0
    for path in FILES:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        for m in SIGNATURE.finditer(text):
            name, arguments, returns = m.groups()
            signature_style = bool(returns) or "*" in _split_arguments(arguments)
            seen += 1
            problems += [f"{path.name}: {p}" for p in _signature_problems(name, arguments, signature_style)]
    assert seen > 50
    assert not problems, "\n".join(problems)


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    """CI is what a new user does: the README's indented ``pip install`` line and its test command."""
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    install = [line.strip() for line in readme if line.startswith("    pip install ")]
    test = [line.strip() for line in readme if line.startswith("    python -m pytest")]
    assert len(install) == 1 and len(test) == 1, (install, test)
    assert install[0] in ci, install[0]
    assert f"\n{test[0]}\n" in ci, test[0]
