"""The layering rules, read from the source with ``ast`` (nothing is imported).

- no import cycle among the modules of ``rcpo_losses/`` and ``kernels/`` (imports inside
  functions count);
- no module imports another module's private (``_name``) definitions, nor a private module;
- every kernel file (one that defines a ``@triton.jit`` function ``*_kernel``) has a PyTorch twin
  ``rcpo_losses/reference/<same name>.py``, and each names the other in its docstring.

The checker runs on a small synthetic package first, so that it is seen to fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rcpo_losses"


def package_modules(roots: dict[str, Path]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under each ``{package prefix: folder}``."""
    modules = {}
    for prefix, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module that ``from <node.module> import ...`` reads from."""
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges ``module -> imported package modules`` and the private imports found, as messages."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, path, node)
                targets = [(base, alias.name) for alias in node.names]
            else:
                continue
            for base, name in targets:
                if base not in modules and not base.startswith(PACKAGE):
                    continue  # torch, triton, the standard library
                sub = f"{base}.{name}" if name else base
                target = sub if sub in modules else base
                if target != module and target in modules:
                    edges[module].add(target)
                hidden = [part for part in target.split(".") if part.startswith("_") and part != "__init__"]
                if name and target == base and name.startswith("_") and base != module:
                    hidden.append(name)
                if hidden and target != module:
                    private.append(f"{module} imports {sub} (private: {', '.join(hidden)})")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def kernel_files(kernels: Path) -> list[Path]:
    """Files of ``kernels/`` that define a Triton kernel (a ``@triton.jit`` function named ``*_kernel``)."""
    out = []
    for path in sorted(kernels.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            is_kernel = isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
            if is_kernel and any("jit" in ast.unparse(d) for d in node.decorator_list):
                out.append(path)
                break
    return out


def test_the_checker_finds_cycles_and_private_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .ops.b import g\n\ndef f():\n    return g()\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "b.py").write_text("def g():\n    from ..a import _helper\n    return _helper\n")
    (pkg / "c.py").write_text("from . import _private_module\n")
    (pkg / "_private_module.py").write_text("")
    edges, private = import_graph(package_modules({PACKAGE: pkg}))
    assert cycles(edges) == [[f"{PACKAGE}.a", f"{PACKAGE}.ops.b"]]
    assert any("ops.b imports rcpo_losses.a._helper" in p for p in private), private
    assert any("c imports rcpo_losses._private_module" in p for p in private), private


def test_no_import_cycles_and_no_private_imports():
    modules = package_modules({PACKAGE: ROOT / PACKAGE, f"{PACKAGE}.kernels": ROOT / "kernels"})
    assert f"{PACKAGE}.ops.backend" in modules and f"{PACKAGE}.kernels.mnl" in modules
    edges, private = import_graph(modules)
    assert f"{PACKAGE}.kernels.mnl" in edges[f"{PACKAGE}.ops.choice"]  # the lazy kernel import is seen
    assert cycles(edges) == []
    assert private == []


def test_each_kernel_file_has_a_pytorch_twin_and_they_name_each_other():
    kernels = kernel_files(ROOT / "kernels")
    assert {p.stem for p in kernels} == {"mnl", "mallows", "token_stats"}
    for path in kernels:
        twin = ROOT / PACKAGE / "reference" / path.name
        assert twin.is_file(), f"{path.name}: no PyTorch twin at {twin.relative_to(ROOT)}"
        kernel_doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        twin_doc = ast.get_docstring(ast.parse(twin.read_text())) or ""
        assert f"{PACKAGE}.reference.{path.stem}" in kernel_doc, f"kernels/{path.name} does not name its twin"
        assert f"{PACKAGE}.kernels.{path.stem}" in twin_doc, f"reference/{path.name} does not name its kernel"
