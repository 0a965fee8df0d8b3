"""The package graph: data flows pipeline -> model (with kernels) -> train; bench only calls into
them."""

import ast
import itertools

from tests.helpers import REPO

PACKAGES = ("pipeline", "kernels", "model", "train", "bench")
# Which packages each may import: the layering the README's diagram draws.
ALLOWED = {
    "pipeline": set(),
    "kernels": set(),
    "model": {"kernels"},
    "train": {"pipeline", "model"},
    "bench": {"pipeline", "kernels", "model", "train"},
}


def module_imports() -> dict[str, set[str]]:
    """module name -> the project modules it imports (anywhere in the file, lazy imports
    included)."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[name] = found
    return {name: {m for m in found if m in graph and m != name} for name, found in graph.items()}


def test_no_import_cycles():
    graph = module_imports()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(
                [*trail, module, target]
            )
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_each_package_imports_only_the_layers_below_it():
    for module, targets in module_imports().items():
        own = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            assert other == own or other in ALLOWED[own], f"{module} imports {target}"


def test_the_graph_is_read_correctly():
    graph = module_imports()
    assert "kernels" in graph["model.mae"] and "pipeline.loader_base" in graph["pipeline.loader"]
    assert len(list(itertools.chain.from_iterable(graph.values()))) > 30


def test_every_listed_bug_still_matches_its_module():
    """tests/mutants.toml's bugs are put back by text: an edit that moves a module's text away from
    an entry must update the entry, or the bug would silently stop being tried."""
    from tests.mutate import main as mutate

    assert mutate(["--check"]) == 0
