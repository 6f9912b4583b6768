"""The package's layering (docs/architecture.md): no import cycle inside src/lottery, and no module imports
one from a higher layer. Imports are read from the source (also those inside functions); imports under
``if TYPE_CHECKING:`` are left out, as they never run."""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "lottery"

# Lowest first; a module may import from its own layer and the layers before it. Keep in step with
# docs/architecture.md.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("lottery", "lottery.errors", "lottery.step", "lottery.distributed", "lottery.io",
                     "lottery.hparams", "lottery.parameters", "lottery.dataset_names")),
    ("data and models", ("lottery.data", "lottery.data.*", "lottery.models", "lottery.models.*", "lottery.masks")),
    ("masking and training", ("lottery.masking", "lottery.masking.*", "lottery.engine", "lottery.engine.*", "lottery.latency")),
    ("methods and outputs", ("lottery.methods", "lottery.methods.*", "lottery.cost", "lottery.export", "lottery.export.*",
                             "lottery.report", "lottery.report.*", "lottery.tracking")),
    ("runs", ("lottery.experiment", "lottery.presets")),
    ("pipelines", ("lottery.pipelines", "lottery.pipelines.*", "lottery.sweep", "lottery.sweep.*")),
    ("interfaces", ("lottery.cli", "lottery.cli.*", "lottery.__main__")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skip |= {id(n) for n in ast.walk(inner)}
    return skip


def _known(name: str) -> str | None:
    """The module of ``name`` (``lottery.masking.prunable_weights`` -> ``lottery.masking``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            m = _known(t) if t.startswith("lottery") else None
            if m and m != module:
                found.add(m)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py (and docs/architecture.md)")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_there_is_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_higher_layer(module):
    mine = layer_of(module)
    upward = sorted(m for m in GRAPH[module] if layer_of(m) > mine)
    assert not upward, (f"{module} ({LAYERS[mine][0]}) imports {upward} from a higher layer "
                        f"({', '.join(LAYERS[layer_of(m)][0] for m in upward)})")


def test_the_reader_sees_imports_inside_functions_and_skips_type_checking_ones():
    assert "lottery.masking" in GRAPH["lottery.cost"]
    assert "lottery.engine.trainer" not in GRAPH["lottery.engine.callbacks"]  # type-only import
    assert "lottery.cli.cs" in GRAPH["lottery.cli.sweep"]  # `from lottery.cli.cs import cs_job` in a function
