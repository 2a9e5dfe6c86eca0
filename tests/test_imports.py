"""No import circles inside `dalle_hf/`: data flows one way (worlds and models, then pipelines, then evaluation,
publishing, the CLI and the app), so no module may import, even inside a function, one that imports it back.

The imports are read with `ast` from every module's source, nothing is imported: `import dalle_hf.x`,
`from dalle_hf.x import y` and relative imports at any level, anywhere in the file. `from package import name` is an
edge to the submodule `package.name` when there is one, else to the package's `__init__.py`. Importing a submodule
also runs its packages' `__init__.py` files; that implicit step is not an edge (it would tie every module to the
package root), so a package's `__init__.py` counts only where it is imported by name.
"""

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "dalle_hf"


def module_names(package_dir: Path) -> dict[str, Path]:
    """`{"dalle_hf.data.shapes": path, "dalle_hf.data": path/__init__.py, ...}` for every module under the package."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module an import of `target` runs: itself, or its longest known prefix (`pkg.module.attr`)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` (at `path`) imports, wherever in the file the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    root = name.split(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.split(".")[0] == root]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the package")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == root:
                source = node.module
            else:
                continue
            # `from pkg import sub` imports the submodule; `from pkg import name` runs pkg/__init__.py.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != name:
                found.add(resolved)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    modules = module_names(package_dir)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component with more than one module, as `[a, b, ..., a]` (Tarjan's SCCs,
    then a shortest path back to the start inside each)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        paths, frontier = {start: [start]}, [start]
        while frontier:  # breadth first, inside the component, until an edge leads back to `start`
            v = frontier.pop(0)
            if v != start and start in graph[v]:
                cycles.append(paths[v] + [start])
                break
            for w in sorted(graph[v] & component):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    frontier.append(w)
    return sorted(cycles)


def test_no_import_circles_in_dalle_hf():
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) > 20 and "dalle_hf.pipeline_dalle" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import circles in dalle_hf (data must flow one way: pass a function in, or move the shared " \
        "piece down):\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)  # fmt: skip


def test_the_layers_the_circles_ran_through_stay_one_way():
    graph = import_graph(PACKAGE_DIR)
    assert "dalle_hf.data.shapes" in graph["dalle_hf.eval.shapes"]
    assert not any(m.startswith("dalle_hf.eval") for m in graph["dalle_hf.data.shapes"])
    assert not any(m.startswith("dalle_hf.pipeline") for m in graph["dalle_hf.model_card"] | graph["dalle_hf.hub"])


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return root / "pkg"


def test_reads_every_kind_of_import(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "from .models import Model\n",
        "models.py": "import os\n",
        "data/__init__.py": "",
        "data/world.py": "from .. import models\nfrom ..models import Model\n",
        "data/shapes.py": "def f():\n    import pkg.data.world\n    from pkg import Model\n",
        "eval/__init__.py": "",
        "eval/shapes.py": "from ..data.shapes import f\nfrom ..data import world\nimport numpy\n",
    })  # fmt: skip
    graph = import_graph(package)
    assert graph["pkg"] == {"pkg.models"}
    assert graph["pkg.data.world"] == {"pkg.models"}
    assert graph["pkg.data.shapes"] == {"pkg.data.world", "pkg"}  # inside a function; a name from pkg/__init__.py
    assert graph["pkg.eval.shapes"] == {"pkg.data.shapes", "pkg.data.world"}
    assert find_cycles(graph) == []


@pytest.mark.parametrize("inject", ["top", "function"])
def test_an_injected_circle_is_found_and_named(tmp_path, inject):
    back = "from ..eval.shapes import check\n" if inject == "top" else "def g():\n    from ..eval import shapes\n"
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/shapes.py": back,
        "eval/__init__.py": "",
        "eval/shapes.py": "from ..data.shapes import f\n",
        "pipeline.py": "from .hub import push\n",
        "hub.py": "from .card import write\n",
        "card.py": "def load():\n    from .pipeline import Pipeline\n",
    })  # fmt: skip
    assert find_cycles(import_graph(package)) == [
        ["pkg.card", "pkg.pipeline", "pkg.hub", "pkg.card"],
        ["pkg.data.shapes", "pkg.eval.shapes", "pkg.data.shapes"],
    ]
