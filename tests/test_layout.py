"""The house rules of the package, read from the source with ``ast``.

- no import cycle among atlas's modules (imports inside functions count: they only hide one);
- no private name (``_x``) imported from another module;
- nothing under ``atlas/site/`` reaches torch or transformers, directly or through other
  atlas modules;
- test modules never import each other; shared code lives in tests/helpers.py and conftest.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import atlas

PACKAGE = Path(atlas.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
HEAVY = {"torch", "transformers"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "_bundled" not in p.parts}


def _top_level(tree: ast.Module):
    """The statements that run on import: the module's body, into if/try blocks but not into functions."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [s for h in getattr(node, "handlers", []) for s in h.body]


def _imports(name: str, on_import_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in module ``name``, absolute;
    with ``on_import_only`` just those that run when the module is imported."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in (_top_level(tree) if on_import_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def _edges(name: str, on_import_only: bool = False) -> set[str]:
    """The atlas modules that module ``name`` imports (a name taken from a package may be a submodule)."""
    edges = set()
    for module, names, _ in _imports(name, on_import_only):
        if module.split(".")[0] != "atlas":
            continue
        subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
        edges |= subs
        if len(subs) < len(names) or not names:
            edges.add(module)
    return edges - {name}


GRAPH = {name: _edges(name) for name in MODULES}


def test_the_walk_sees_every_package():
    assert {"atlas.site.render", "atlas.site.text", "atlas.stages.contract", "atlas.model.load",
            "atlas.bench.stages", "atlas.schema", "atlas.pipeline"} <= set(MODULES)
    assert "atlas.site.text" in GRAPH["atlas.site.render"]


def test_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_module():
    crossings = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {n} from {module}"
                 for name in MODULES for module, names, line in _imports(name)
                 for n in names if n.startswith("_") and not n.startswith("__")]
    assert not crossings, "\n".join(crossings)


def _heavy_reached(start: str, on_import_only: bool = False) -> list[tuple[str, str]]:
    """(module, torch-like import) for every atlas module ``start`` reaches that imports torch or transformers.

    With ``on_import_only`` only the imports that run on import count, and a module also
    reaches its parent packages (Python runs their ``__init__`` first).
    """
    found, seen, todo = [], set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        heavy = [m for m, _, _ in _imports(name, on_import_only) if m.split(".")[0] in HEAVY]
        if heavy:
            found.append((name, heavy[0]))
        if on_import_only:
            todo += _edges(name, True) | ({name.rpartition(".")[0]} if "." in name else set())
        else:
            todo += GRAPH[name]
    return found


def test_the_site_never_reaches_torch():
    site = [name for name in MODULES if name.startswith("atlas.site")]
    assert len(site) > 5
    bad = [f"{start} reaches {name}, which imports {heavy}" for start in site for name, heavy in _heavy_reached(start)]
    assert not bad, "\n".join(bad)


def test_the_command_line_and_the_build_load_torch_only_when_a_stage_runs():
    """`atlas info`, `render`, `search` and `--help` start in a fraction of a second: importing
    the CLI, the pipeline or the stage registry runs no import of torch or transformers."""
    bad = [f"importing {start} imports {name}, which imports {heavy}"
           for start in ("atlas.cli", "atlas.pipeline", "atlas.stages", "atlas")
           for name, heavy in _heavy_reached(start, on_import_only=True)]
    assert not bad, "\n".join(bad)


def test_test_modules_do_not_import_each_other():
    found = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(TESTS)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] == "conftest" or n.split(".")[0].startswith("test_")]
    assert not found, "\n".join(found)


def test_only_a_run_with_ray_imports_ray():
    """Ray is an optional extra: only ``atlas.distributed`` imports it, and every module reaches
    ``atlas.distributed`` inside a function (a stage run with ``--ray``), never on import."""
    direct = [f"{name} imports {m}" for name in MODULES for m, _, _ in _imports(name)
              if m.split(".")[0] == "ray" and name != "atlas.distributed"]
    on_import = [f"{name} imports atlas.distributed on import" for name in MODULES
                 if "atlas.distributed" in _edges(name, on_import_only=True)]
    users = [name for name in MODULES if "atlas.distributed" in GRAPH[name]]
    assert {"atlas.stages.exemplars", "atlas.stages.clamp"} <= set(users)
    assert not direct + on_import, "\n".join(direct + on_import)
