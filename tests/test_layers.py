"""The house stays one-way: every import in src/ goes to a lower layer or within its own
package, and no import loop exists anywhere (between packages or between modules of one
package). The layers, lowest first, are those of the README's architecture section."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = [
    {"errors", "units", "direct_io", "blocking"},
    {"blockdev", "progress", "unix_socket", "row_render"},
    {"pdata"},
    {"dm"},
    {"era", "snapshot"},
    {"engine"},
    {"nbd"},
    {"backup"},
    {"live"},
    {"cli", "__init__"},
    {"__main__"},
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "blockera").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every blockera module `module` imports, anywhere in the file (functions included)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from package import submodule` imports the submodule (the package's __init__
            # runs first whatever is imported, which is no dependency of ours); any other
            # name comes from the package itself
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("blockera"):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_has_a_layer() -> None:
    assert {_part(m) for m in _graph()} <= set(LAYER_OF)


def test_no_import_goes_up_or_sideways() -> None:
    wrong = []
    for module, imported in _graph().items():
        for target in imported:
            a, b = _part(module), _part(target)
            if a != b and target != "blockera" and LAYER_OF[b] >= LAYER_OF[a]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_loops() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    loops: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == "blockera" or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                loops.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not loops, "import loops:\n" + "\n".join(loops)
