"""The package's shape: floors that import only downward, no import cycles,
and schedule names only where schedules are defined."""
from __future__ import annotations

import ast
from pathlib import Path

import mtrain
from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES

PACKAGE = Path(mtrain.__file__).parent
KERNELS = PACKAGE.parent / "kernels"  # installed as mtrain.kernels

# Floors, bottom first: a module may import its own floor and the ones below.
FLOORS = ["runtime", "parallel", "model", "pipeline", "data", "train", "launch", "planner", "cli"]
# Packages beside the floors, each pinned at the floor of the highest thing it imports.
UTILITIES = {"config": -1, "kernels": -1, "testing": 0}
# Where a schedule may be named: its rules, its builders, the config schema, the CLI.
SCHEDULE_NAME_HOMES = ("pipeline/schedule_rules.py", "pipeline/schedules.py", "config/schema.py", "cli/")


def _sources() -> dict[str, Path]:
    """Module name -> file, for mtrain and its kernels."""
    out = {}
    for root, prefix in ((PACKAGE, "mtrain"), (KERNELS, "mtrain.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix] + parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> mtrain modules it imports, anywhere in the file (inside
    functions too). ``from pkg import name`` counts ``pkg.name`` when that is a
    module, else ``pkg``."""
    sources = _sources()
    graph = {}
    for module, path in sources.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node, path.name == "__init__.py")
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            targets |= {n for n in names if n in sources and n != module}
        graph[module] = targets
    return graph


def floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if top in UTILITIES:
        return UTILITIES[top]
    return FLOORS.index(top) if top in FLOORS else len(FLOORS)


def test_every_package_has_a_floor():
    unplaced = sorted({m.split(".")[1] for m in import_graph() if "." in m and floor(m) == len(FLOORS)})
    assert unplaced == [], f"modules outside the floors: {unplaced}; add them to FLOORS or UTILITIES"


def test_imports_only_run_down_the_floors():
    upward = [f"{m} ({FLOORS[floor(m)] if floor(m) >= 0 else 'bottom'}) imports {t}"
              for m, targets in import_graph().items() for t in sorted(targets) if floor(t) > floor(m)]
    assert upward == [], "\n".join(upward)


def test_runtime_imports_only_torch_and_itself():
    for module, path in _sources().items():
        if not module.startswith("mtrain.runtime"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for root in roots:
                top = root.split(".")[0]
                assert top in ("torch", "mtrain", "__future__") or top in _stdlib(), (module, root)
                if top == "mtrain":
                    assert root.startswith("mtrain.runtime"), (module, root)


def _stdlib() -> set[str]:
    import sys

    return set(sys.stdlib_module_names)


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ importing its submodules is not a cycle with them.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_checks_catch_what_they_look_for():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert floor("mtrain.model.moe.layer") < floor("mtrain.pipeline.executor") < floor("mtrain.cli.train")
    assert "mtrain.runtime.context" in import_graph()["mtrain.runtime.program"]


def test_schedule_names_only_where_schedules_are_defined():
    found = []
    for module, path in _sources().items():
        rel = path.relative_to(PACKAGE).as_posix() if path.is_relative_to(PACKAGE) else path.name
        if rel.startswith(SCHEDULE_NAME_HOMES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in SCHEDULE_NAMES:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert found == [], "ask the schedule rules or the Placement instead:\n" + "\n".join(found)
