"""The layering rules, read from the source with ``ast`` (nothing is imported).

- no import cycle among the modules of ``rcpo_losses/`` and ``kernels/rcpo_kernels/`` (imports inside
  functions count);
- no module imports another module's private (``_name``) definitions, nor a private module;
- three layers, each importing only itself and the layers below it: the choice losses (the modules at
  the top of ``rcpo_losses/``, with ``ops/``, ``reference/`` and the kernels), then ``tokens/``, then
  ``training/``. Façades stand outside the order: the package ``__init__`` (it re-exports
  ``response_stats`` and ``precompute_reference_stats``), the old dotted paths kept for one release
  (``generate``, ``data``, ``precompute``, ``integrations.*``) and the ``demo``;
- modules import only the standard library, torch, numpy and triton when loaded, except the trainers
  (a ``transformers.Trainer``): the rest import transformers, peft and the like inside functions;
- every kernel file (one that defines a ``@triton.jit`` function ``*_kernel``) has a PyTorch twin
  ``rcpo_losses/reference/<same name>.py``, and each names the other in its docstring.

The checker runs on a small synthetic package first, so that it is seen to fail.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rcpo_losses"
KERNELS = ROOT / "kernels" / "rcpo_kernels"  # shipped as rcpo_losses.kernels (pyproject.toml's package-dir)
LAYERS = {"tokens": 1, "training": 2}  # subpackage -> layer; every other module is layer 0 (the choice losses)
FACADES = ("generate", "data", "precompute", "integrations", "demo")  # beside the order (and the package __init__)
LOADS_A_LIBRARY = (f"{PACKAGE}.training.trainer", f"{PACKAGE}.training.online")  # transformers.Trainer subclasses
ALLOWED_AT_LOAD = {"torch", "numpy", "triton", PACKAGE}  # besides the standard library


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


def layer(module: str) -> int | None:
    """The layer of a module: 0 the choice losses, 1 ``tokens``, 2 ``training``; None for a façade."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FACADES:
        return None
    return LAYERS.get(parts[1], 0)


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer to a higher one, as messages."""
    names = {0: "choice losses", 1: "tokens", 2: "training"}
    found = []
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            if layer(m) is not None and layer(t) is not None and layer(t) > layer(m):
                found.append(f"{m} ({names[layer(m)]}) imports {t} ({names[layer(t)]})")
    return found


def load_time_imports(path: Path) -> set[str]:
    """Top-level package names imported when the module is loaded (function bodies excluded)."""
    found, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return found


def foreign_imports(modules: dict[str, Path]) -> list[str]:
    """Modules (the trainer aside) that import a library other than torch, numpy and triton when loaded."""
    bad = []
    for module, path in modules.items():
        if module in LOADS_A_LIBRARY:
            continue
        extra = load_time_imports(path) - ALLOWED_AT_LOAD - set(sys.stdlib_module_names)
        if extra:
            bad.append(f"{module} imports {sorted(extra)} when loaded")
    return bad


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
    """Files of the kernel folder that define a Triton kernel (a ``@triton.jit`` function named ``*_kernel``)."""
    out = []
    for path in sorted(kernels.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            is_kernel = isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
            if is_kernel and any("jit" in ast.unparse(d) for d in node.decorator_list):
                out.append(path)
                break
    return out


def test_the_checker_finds_cycles_private_imports_and_upward_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .ops.b import g\n\ndef f():\n    return g()\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "b.py").write_text("def g():\n    from ..a import _helper\n    return _helper\n")
    (pkg / "c.py").write_text("from . import _private_module\n")
    (pkg / "_private_module.py").write_text("")
    for sub in ("tokens", "training"):
        (pkg / sub).mkdir()
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "training" / "generate.py").write_text("import json\n\nimport tqdm\n\ndef f():\n    import transformers\n")
    (pkg / "tokens" / "stats.py").write_text("def g():\n    from ..training.generate import f\n    from .. import a\n")
    (pkg / "d.py").write_text("from .tokens import stats\n\ndef g():\n    import transformers\n")
    (pkg / "generate.py").write_text("from .training.generate import f\n")  # an old path: a façade
    modules = package_modules({PACKAGE: pkg})
    edges, private = import_graph(modules)
    assert cycles(edges) == [[f"{PACKAGE}.a", f"{PACKAGE}.ops.b"]]
    assert layer_violations(edges) == [
        f"{PACKAGE}.d (choice losses) imports {PACKAGE}.tokens.stats (tokens)",
        f"{PACKAGE}.tokens.stats (tokens) imports {PACKAGE}.training.generate (training)",
    ]
    assert foreign_imports(modules) == [f"{PACKAGE}.training.generate imports ['tqdm'] when loaded"]
    assert any("ops.b imports rcpo_losses.a._helper" in p for p in private), private
    assert any("c imports rcpo_losses._private_module" in p for p in private), private


def test_no_import_cycles_and_no_private_imports():
    modules = package_modules({PACKAGE: ROOT / PACKAGE, f"{PACKAGE}.kernels": KERNELS})
    assert f"{PACKAGE}.ops.backend" in modules and f"{PACKAGE}.kernels.mnl" in modules
    edges, private = import_graph(modules)
    assert f"{PACKAGE}.kernels.mnl" in edges[f"{PACKAGE}.ops.choice"]  # the lazy kernel import is seen
    assert cycles(edges) == []
    assert private == []


def test_each_layer_imports_only_itself_and_the_layers_below_and_no_other_library():
    modules = package_modules({PACKAGE: ROOT / PACKAGE, f"{PACKAGE}.kernels": KERNELS})
    assert f"{PACKAGE}.training.generate" in modules and f"{PACKAGE}.tokens.stats" in modules
    assert {layer(m) for m in modules} == {None, 0, 1, 2}
    edges, _ = import_graph(modules)
    assert layer_violations(edges) == []
    assert foreign_imports(modules) == []


def test_each_kernel_file_has_a_pytorch_twin_and_they_name_each_other():
    kernels = kernel_files(KERNELS)
    assert {p.stem for p in kernels} == {"mnl", "mallows", "token_stats"}
    for path in kernels:
        twin = ROOT / PACKAGE / "reference" / path.name
        assert twin.is_file(), f"{path.name}: no PyTorch twin at {twin.relative_to(ROOT)}"
        kernel_doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        twin_doc = ast.get_docstring(ast.parse(twin.read_text())) or ""
        assert f"{PACKAGE}.reference.{path.stem}" in kernel_doc, f"{path.relative_to(ROOT)} does not name its twin"
        assert f"{PACKAGE}.kernels.{path.stem}" in twin_doc, f"reference/{path.name} does not name its kernel"
