"""memlens is layered one way: core -> data -> methods -> figures -> orchestration.

The import graph of memlens/ has no cycle, no module imports another's private (``_name``)
object, plotly is imported only by figures, the report and orchestration, and every import
points to the same or a lower layer.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "memlens"
LAYERS = {
    "core": 0,
    "corpus": 1, "organism": 1, "labels": 1, "capture": 1, "splits": 1,
    "edits": 2, "probes": 2, "curvature": 2, "interventions": 2, "localize": 2, "subnet": 2,
    "steering": 2, "layernorm": 2, "audit": 2,
    "figures": 3, "report": 3, "notebook": 3,
    "pipeline": 4, "demo": 4, "cli": 4, "__main__": 4, "__init__": 4,
}
PLOTLY_OK = {"figures", "report", "pipeline", "demo", "cli"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("memlens", *path.relative_to(ROOT).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text())
    return out


def imports(tree: ast.Module):
    """(module, names) for every import, at any depth (function-level ones included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_every_module_has_a_layer():
    assert {m.split(".")[1] for m in modules() if "." in m} <= set(LAYERS)


def test_imports_point_down_with_no_cycle_and_no_private_names():
    mods = modules()
    graph, problems = {}, []
    for name, tree in mods.items():
        graph[name] = set()
        for target, names in imports(tree):
            if not target.startswith("memlens"):
                continue
            for n in names:  # "from memlens.core import errors" names a module
                if f"{target}.{n}" in mods:
                    graph[name].add(f"{target}.{n}")
                elif n.startswith("_") and n != "__version__":
                    problems.append(f"{name} imports private {target}.{n}")
            if target in mods and not any(f"{target}.{n}" in mods for n in names):
                graph[name].add(target)
        if name != "memlens":
            for dep in graph[name]:
                if dep != "memlens" and layer(dep) > layer(name):
                    problems.append(f"{name} (layer {layer(name)}) imports {dep} "
                                    f"(layer {layer(dep)})")
    state: dict[str, int] = {}

    def visit(u, stack):
        state[u] = 1
        for v in graph.get(u, ()):
            if v == "memlens" or u == "memlens":
                continue  # the package's re-exports
            if state.get(v) == 1:
                problems.append("cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            elif not state.get(v):
                visit(v, stack + [v])
        state[u] = 2

    for u in graph:
        if not state.get(u):
            visit(u, [u])
    assert not problems, "\n".join(problems)


def test_plotly_only_in_figures_report_and_orchestration():
    offenders = [name for name, tree in modules().items()
                 if any(t.split(".")[0] == "plotly" for t, _ in imports(tree))
                 and name.split(".")[-1] not in PLOTLY_OK]
    assert offenders == []


def test_one_scoring_kernel():
    """Logits come from memlens.core.scoring.forward only; the "predicts index >= start"
    mask from memlens.core.scoring.predicts only."""
    hits = []
    for path in ROOT.rglob("*.py"):
        if path.name == "scoring.py":
            continue
        text = path.read_text()
        for needle in (".logits", "mask[:, :-1]", "mask[:, 1:]"):
            if needle in text:
                hits.append(f"{path.relative_to(ROOT)}: {needle}")
    assert hits == []
