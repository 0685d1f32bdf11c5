"""The import rules of docs/ARCHITECTURE.md ("Tiers and the one-way rule"), read off the
source with Python's own ``ast``: every import statement counts, at module level or inside
a function, except those under ``if TYPE_CHECKING:`` (there are none today)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGES = ("cluster", "workers", "layers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str:
    """The project module an imported name lives in (``a.b.c`` -> ``a.b`` if ``c`` is not a
    module), or the name itself for other packages."""
    while name and name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path, module_level: bool = False) -> set[str]:
    """What ``path`` imports; with ``module_level``, only what importing it runs (not the
    imports inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    if module_level:
        skip |= {id(n) for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(_resolve(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(_resolve(f"{node.module}.{a.name}") for a in node.names)
    return found


GRAPH = {name: _imports(path) for name, path in MODULES.items()}
ON_IMPORT = {name: _imports(path, module_level=True) for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_was_read():
    """A guard for the rules below: the graph holds the modules and edges it must."""
    assert {"cluster.engine.engine", "workers.worker", "layers.attention"} <= set(GRAPH)
    assert "layers.models.llama" in GRAPH["workers.worker"] or "layers.models" in GRAPH["workers.worker"]
    assert "torch" in GRAPH["layers.attention"]


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if dep not in GRAPH or dep == node:
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def _violations(selector, forbidden) -> list[str]:
    return [f"{m} imports {d}" for m, deps in sorted(GRAPH.items()) if selector(m)
            for d in sorted(deps) if forbidden(d)]


def test_layers_import_nothing_of_the_driver_or_workers():
    assert _violations(lambda m: _top(m) == "layers", lambda d: _top(d) in ("cluster", "workers")) == []


def test_workers_import_only_the_contract_of_the_driver():
    assert _violations(lambda m: _top(m) == "workers",
                       lambda d: _top(d) == "cluster" and not d.startswith("cluster.contract")) == []


def test_the_contract_stands_alone():
    """The contract (messages, config, errors, events) is plain Python: no torch, no Ray, and
    nothing else of the project."""
    assert _violations(lambda m: m.startswith("cluster.contract"),
                       lambda d: _top(d) in ("workers", "layers", "torch", "ray")
                       or (_top(d) == "cluster" and not d.startswith("cluster.contract"))) == []


@pytest.mark.parametrize("tier,above", [
    ("cluster.engine", ("cluster.serving", "cluster.bench", "cluster.tools", "cluster.cli")),
    ("cluster.checkpoints", ("cluster.engine", "cluster.serving", "cluster.bench", "cluster.tools")),
    ("cluster.serving", ("cluster.bench", "cluster.tools", "cluster.cli")),
])
def test_driver_tiers_import_downwards(tier, above):
    assert _violations(lambda m: m.startswith(tier), lambda d: d.startswith(above)) == []


def _closure(start: str, graph: dict = GRAPH) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(d for d in graph.get(module, ()) if d in graph)
    return seen | {d for m in seen for d in graph.get(m, ())}


@pytest.mark.parametrize("entry", ["cluster.serving.client", "cluster.contract.sampling",
                                   "cluster.contract.config"])
def test_the_client_side_needs_no_torch(entry):
    """Everything a client handle (or a config/params builder) can reach, even through
    imports inside functions, is free of torch, transformers and the worker side."""
    heavy = sorted(d for d in _closure(entry) if _top(d) in ("torch", "transformers", "workers", "layers"))
    assert heavy == [], heavy


def test_the_service_class_unpickles_without_torch():
    """A client's ``ray.get_actor`` unpickles the engine service's class, importing its
    module: importing it must not reach torch (the engine itself is imported when the
    service starts it)."""
    heavy = sorted(d for d in _closure("cluster.serving.service", ON_IMPORT)
                   if _top(d) in ("torch", "transformers", "workers", "layers"))
    assert heavy == [], heavy


def test_import_cluster_and_connect_load_no_torch():
    """In a fresh interpreter: ``import cluster`` and resolving ``cluster.connect`` (which
    imports the client and its stream reader) load neither torch nor transformers."""
    code = ("import sys, cluster; from cluster import SamplingParams; cluster.connect; "
            "import cluster.serving.client, cluster.serving.service; "
            "print(sorted(m for m in ('torch', 'transformers', 'layers', 'workers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
