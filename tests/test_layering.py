"""The house rules of the import graph, read statically from every import in the source (those inside
functions included), so a rule breaks the moment someone writes the import.

- model/ and data/ know nothing of federation: no Flower, no node, coordinator or strategy;
- training/ (the loop a node, the centralized baseline and the coordinator's evaluation share) is
  plain torch on top of model/, data/ and common/;
- a node (client_app/) never imports the coordinator, the strategy, the engines or the lab;
- the strategy knows no training loop and no node;
- the coordinator (server_app/) never imports the node, the engines or the lab;
- federation/ (the operator's certificates and keys) stands apart from the method and the lab;
- nothing imports sim/ (the command), and nothing outside bench/ and faults/ imports them;
- no circles, between packages or between modules.
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
LAB = {"bench", "faults", "sim"}
FORBIDDEN = {
    "model": {"flwr", "client_app", "server_app", "strategy", "engine", "training", "common", *LAB},
    "data": {"flwr", "client_app", "server_app", "strategy", "engine", "training", "common", *LAB},
    "training": {"flwr", "client_app", "server_app", "strategy", "engine", *LAB},
    "common": {"client_app", "server_app", "strategy", "engine", "training", *LAB},
    "client_app": {"server_app", "strategy", "engine", *LAB},
    "strategy": {"client_app", "server_app", "training", "engine", *LAB},
    "server_app": {"client_app", "engine", *LAB},
    "engine": LAB,
    "evaluation": {"client_app", "engine", *LAB},
    "federation": {"client_app", "server_app", "strategy", "engine", "training", "model", "data", *LAB},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute, inside functions too."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    files = {_module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    return {mod: {m for m in _imports(path) if m in files} for mod, path in files.items()}


def _third_party(pkg: str) -> set[str]:
    return {m.split(".")[0] for f in (ROOT / pkg).rglob("*.py") for m in _imports(f)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_it_must_not(package):
    graph = _graph()
    used = {m.split(".")[0] for mod, deps in graph.items() if mod.split(".")[0] == package for m in deps}
    used |= _third_party(package) & {"flwr"}
    assert not used & FORBIDDEN[package], f"{package} imports {sorted(used & FORBIDDEN[package])}"


def test_nothing_imports_the_lab_from_outside():
    for mod, deps in _graph().items():
        home = mod.split(".")[0]
        for dep in deps:
            target = dep.split(".")[0]
            if target == "sim":
                assert home == "sim", f"{mod} imports {dep}: sim/ is the command, nothing imports it"
            if target in ("bench", "faults"):
                assert home == target, f"{mod} imports {dep}"


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_circle_between_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for mod, deps in _graph().items():
        packages[mod.split(".")[0]] |= {d.split(".")[0] for d in deps} - {mod.split(".")[0]}
    assert _cycle(packages) is None, " -> ".join(_cycle(packages))


def test_no_circle_between_modules():
    graph = _graph()
    # `import pkg.mod` also runs pkg/__init__.py; a package's __init__ re-exporting its own
    # modules is not a circle of ours, so edges into a package's own __init__ are left out.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


SHORT_FUNCTIONS = ("model", "strategy", "client_app", "server_app", "common")


def test_functions_of_the_method_and_its_glue_fit_on_a_screen():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for pkg in SHORT_FUNCTIONS
        for path in (ROOT / pkg).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long


def test_no_source_file_over_500_lines():
    files = [f for pkg in [*PACKAGES, "tests", "scripts"] for f in (ROOT / pkg).rglob("*.py")]
    long = [f"{f.relative_to(ROOT)} ({n} lines)" for f in files if (n := f.read_text().count("\n")) > 500]
    assert not long, long
