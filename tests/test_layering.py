"""The package's layers (docs/architecture.md) hold: every import points down or sideways within its
layer, the import graph has no cycle, no module imports another module's `_private` name, and no
import of the package's own modules hides inside a function (except the few listed below, each for
an optional dependency, never to dodge a cycle). Read from the source with `ast`, function-level
imports included, so the structure cannot slide back unnoticed."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "amct_pytorch"
PACKAGE = "amct_pytorch"

# lowest first; a module may import modules of its own layer or below
LAYERS = [
    ("leaves", ["config", "functional", "ifmr", "distributed", "runtime", "params", "ops", "saturation", "pair_grid",
                "blockwise"]),
    ("autograd", ["qat_function"]),
    ("modules", ["nn"]),
    ("whole-model", ["convert", "batchnorm", "outliers", "quant_record", "training"]),
    ("deployment", ["export"]),
    ("integrations", ["fsdp", "hf"]),
    ("applications", ["cli", "demo"]),
    ("package", [""]),  # amct_pytorch/__init__.py: the public names
]

# function-level imports of the package's own modules that are allowed, and why
LAZY_IMPORTS = {
    # transformers is optional: `import amct_pytorch` must not import it
    ("amct_pytorch", "amct_pytorch.hf"),
    # a demo's main (transformers, matplotlib, its data) loads only when that demo runs, so that
    # `amct-qat --help` and the other demo start fast and tests can patch main.run_*_demo
    ("amct_pytorch.demo.minilm.cli", "amct_pytorch.demo.minilm.main"),
    ("amct_pytorch.demo.crepe.cli", "amct_pytorch.demo.crepe.main"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def layer_of(module: str) -> int:
    rel = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if rel == prefix or (prefix and rel.startswith(prefix + ".")):
                return index
    raise AssertionError(f"{module}: assign it a layer in tests/test_layering.py (and docs/architecture.md)")


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Imports(ast.NodeVisitor):
    """(imported module, names, line, inside a function) for every import of the package."""

    def __init__(self, importer: str, is_package: bool):
        self.importer, self.is_package = importer, is_package
        self.found: list[tuple[str, list[str], int, bool]] = []
        self.depth = 0

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self.found.append((alias.name, [], node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node):
        target = _resolve(self.importer, self.is_package, node)
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            return
        names = [a.name for a in node.names]
        # `from pkg import submodule` imports the submodule
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        if subs:
            for sub in subs:
                self.found.append((sub, [], node.lineno, self.depth > 0))
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest:
                self.found.append((target, rest, node.lineno, self.depth > 0))
        else:
            self.found.append((target, names, node.lineno, self.depth > 0))


def _graph():
    edges = {}
    for name, path in MODULES.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges[name] = visitor.found
    return edges


EDGES = _graph()


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_point_down_or_sideways():
    bad = []
    for importer, found in EDGES.items():
        for target, _, line, _ in found:
            if target not in MODULES:
                bad.append(f"{importer}:{line} imports {target}, which is not a module of the package")
            elif layer_of(target) > layer_of(importer):
                bad.append(f"{importer}:{line} ({LAYERS[layer_of(importer)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]}), a layer above it")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: sorted({t for t, *_ in found if t in MODULES and t != m}) for m, found in EDGES.items()}
    # a package's __init__ runs when any of its modules is imported: its own re-exports of them
    # are not edges back into it
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_file():
    bad = [f"{importer}:{line} imports {n} from {target}"
           for importer, found in EDGES.items() for target, names, line, _ in found
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_function_level_import_of_the_package_but_the_listed_ones():
    bad = [f"{importer}:{line} imports {target} inside a function"
           for importer, found in EDGES.items() for target, _, line, lazy in found
           if lazy and (importer, target) not in LAZY_IMPORTS]
    assert not bad, "\n".join(bad) + "\n(move it to the top of the file; if it is for an optional dependency, " \
                                     "list it in LAZY_IMPORTS with the reason)"


@pytest.mark.parametrize("source, message", [
    ("from ....export import export_onnx\n", "a layer above it"),
    ("from .base import _FORCE\n", "imports _FORCE"),
])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, source, message):
    # a module of the modules layer that imports upward, or a private name, is reported
    name = f"{PACKAGE}.nn.module.quantization.probe"
    visitor = _Imports(name, False)
    visitor.visit(ast.parse(source))
    target, names, line, _ = visitor.found[0]
    if message == "a layer above it":
        assert layer_of(target) > layer_of(name)
    else:
        assert any(n.startswith("_") for n in names)
