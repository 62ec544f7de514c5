"""edgekd's import graph, built from the source (ast), follows the stage order and has no cycle.

Data flows one way: data -> models -> distill -> explain -> export -> bench -> report. Below all of them sit the
shared records, the role grammar, the profile types, the torch-free runtime and the pipeline; above them the
entry points (the CLI, the composition root, the plan check, the torchrun worker). Every import counts, lazy ones
inside functions too; only `if TYPE_CHECKING:` blocks (annotations) are left out.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgekd"
STAGES = ("data", "models", "distill", "explain", "export", "bench", "report")
BASE = ("edgekd", "errors", "registry", "runio", "roles", "records", "config", "targets", "gpu", "envinfo", "runtime",
        "pipeline", "timing", "pte")
ENTRY_POINTS = ("edgekd.cli", "edgekd.check", "edgekd.workflows", "edgekd.tracking",
                "edgekd.distill.worker")  # the worker is torchrun's `-m` target: an entry point inside distill
TORCH_FREE = ("edgekd.pipeline", "edgekd.runtime", "edgekd.records", "edgekd.roles", "edgekd.runio")
HEAVY = ("torch", "torchvision", "timm", "onnx", "onnxscript", "torchao", "captum")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> edgekd modules it imports, module -> third-party top-level packages it imports)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph, external = {}, {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps, outside = set(), set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    (deps.add(resolve(alias.name)) if alias.name.startswith("edgekd")
                     else outside.add(alias.name.split(".")[0]))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.startswith("edgekd"):
                    outside.add(source.split(".")[0])
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    deps.add(full if full in modules else resolve(source))
        deps.discard(None)
        deps.discard(name)
        graph[name], external[name] = deps, outside
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    """0 for the shared base, 1.. for the stages in data-flow order, above them the entry points."""
    if module in ENTRY_POINTS:
        return len(STAGES) + 1
    top = module.split(".")[1] if "." in module else module
    if top in BASE:
        return 0
    return STAGES.index(top) + 1


GRAPH, EXTERNAL = import_graph()


def test_every_module_has_a_layer():
    unplaced = []
    for module in GRAPH:
        try:
            layer(module)
        except ValueError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"


def test_the_import_graph_has_no_cycle():
    assert cycles(GRAPH) == []


def test_no_import_runs_against_the_stage_order():
    backwards = [f"{m} -> {d}" for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert backwards == []


@pytest.mark.parametrize("below", TORCH_FREE)
def test_the_layers_below_the_stages_import_no_training_stack(below):
    heavy = [f"{m} imports {p}" for m, packages in sorted(EXTERNAL.items())
             if m == below or m.startswith(below + ".") for p in sorted(packages & set(HEAVY))]
    assert heavy == []


def test_export_and_bench_meet_only_in_the_runtime():
    """Export and bench share the runners, the eval set and TensorRT's checks through edgekd.runtime; neither
    imports the other (a bench on a device has no exporter, an export needs no bench)."""
    crossing = [f"{m} -> {d}" for m, deps in sorted(GRAPH.items()) for d in sorted(deps)
                if (m.startswith("edgekd.export") and d.startswith("edgekd.bench"))
                or (m.startswith("edgekd.bench") and d.startswith("edgekd.export"))]
    assert crossing == []


def test_the_checker_sees_a_cycle_and_a_backward_import():
    """The checks above can fail: a two-module cycle and a stage importing a later one are found."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer("edgekd.distill.train") < layer("edgekd.report.tables")
    assert layer("edgekd.pipeline.driver") == 0 < layer("edgekd.data.splits")
