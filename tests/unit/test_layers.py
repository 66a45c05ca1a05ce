"""memlens is layered one way, and its folders are the layers:

    core/ -> data/ -> methods/ -> report/ -> steps/ -> cli, the package

The import graph of memlens/ has no cycle, no module imports another's private (``_name``)
object, plotly is imported only by report/ and steps/, every import points to the same or
a lower layer, and every module declares its public names (``__all__``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2] / "memlens"
# Folders, lowest first; modules at the top (the command line, ``python -m memlens``, the
# package's own names) sit above them all.
FOLDERS = ("core", "data", "methods", "report", "steps")
TOP = len(FOLDERS)
PLOTLY_OK = ("report", "steps")


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("memlens", *path.relative_to(ROOT).with_suffix("").parts))
        tree = ast.parse(path.read_text())
        tree.package = name.removesuffix(".__init__") if path.name == "__init__.py" else (
            name.rpartition(".")[0])
        out[name.removesuffix(".__init__")] = tree
    return out


def absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a (possibly relative: ``from ..core import x``) import names."""
    if node.level == 0:
        return node.module
    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(tree: ast.Module):
    """(module, names) for every import, at any depth (function-level ones included), with
    relative imports resolved against the module's package."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield absolute(node, tree.package), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_relative_imports_are_resolved():
    tree = ast.parse("from ..core import errors\nfrom .metrics import f\nfrom . import x")
    tree.package = "memlens.core"
    assert [m for m, _ in imports(tree)] == ["memlens.core", "memlens.core.metrics",
                                             "memlens.core"]
    tree.package = "memlens.methods.probes"
    assert [m for m, _ in imports(tree)][0] == "memlens.methods.core"


def layer(module: str) -> int:
    """The layer of ``memlens.FOLDER.x`` is its folder's; a top-level module's is TOP."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in FOLDERS):
        return FOLDERS.index(parts[1])
    return TOP


def test_every_folder_is_a_layer_and_only_entry_points_sit_at_the_top():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FOLDERS)
    top = {m for m in modules() if layer(m) == TOP}
    assert top == {"memlens", "memlens.cli", "memlens.__main__"}


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


def test_plotly_only_in_report_and_steps():
    offenders = [name for name, tree in modules().items()
                 if any(t.split(".")[0] == "plotly" for t, _ in imports(tree))
                 and (name.count(".") < 2 or name.split(".")[1] not in PLOTLY_OK)]
    assert offenders == []


def kernel_bypasses(source: str) -> list[str]:
    """Places in ``source`` that compute logits or the prediction mask themselves: reading
    ``.logits``, calling a model (``model(...)``, ``handle.model(...)[0]``), or slicing an
    attention mask by shifted positions, however the code is spaced."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "logits":
            hits.append(f"line {node.lineno}: .logits")
        elif isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Name) and node.func.id == "model")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "model")):
            hits.append(f"line {node.lineno}: a model call")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple) and (
                "mask" in ast.unparse(node.value)
                and ast.unparse(node.slice).strip("()").replace(" ", "") in (":,:-1", ":,1:")):
            hits.append(f"line {node.lineno}: a shifted mask")
    return hits


def test_the_bypass_check_sees_through_spelling():
    assert kernel_bypasses("y = handle.model(ids)[0]") == ["line 1: a model call"]
    assert kernel_bypasses("y = model(input_ids=ids)") == ["line 1: a model call"]
    assert kernel_bypasses("out.logits") == ["line 1: .logits"]
    assert kernel_bypasses("m = attn_mask[ :,  :-1 ]") == ["line 1: a shifted mask"]
    assert kernel_bypasses("y = forward(handle, ids, mask)") == []


def test_one_scoring_kernel():
    """Logits come from memlens.core.scoring.forward only; the "predicts index >= start"
    mask from memlens.core.scoring.predicts only. (memlens.core.sites runs the model to
    record activations, never logits.)"""
    hits = []
    for path in ROOT.rglob("*.py"):
        if path.name == "scoring.py":
            continue
        for hit in kernel_bypasses(path.read_text()):
            if path.name == "sites.py" and hit.endswith("a model call"):
                continue
            hits.append(f"{path.relative_to(ROOT)} {hit}")
    assert hits == []


def test_every_module_declares_its_public_names_and_they_exist():
    import importlib

    problems = []
    for name in modules():
        if name == "memlens.__main__":  # importing it runs the command line
            continue
        mod = importlib.import_module(name)
        if not hasattr(mod, "__all__"):
            problems.append(f"{name} has no __all__")
            continue
        problems += [f"{name}.__all__ names {n!r}, which it does not define"
                     for n in mod.__all__ if not hasattr(mod, n)]
    assert problems == []
