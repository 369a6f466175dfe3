"""The package's layering, read off its imports (ASTs only; nothing is imported): no import
cycles, no module importing another module's _private names, and no layer importing a higher
one. Function-level imports count: they are for optional dependencies, not for hiding a cycle.
"""
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlp"

# lowest first; a module may import its own layer and the ones before it
LAYERS = [
    ("vlp.config", "vlp.tokenizer"),
    ("vlp.data",),
    ("vlp.modeldir",),
    ("vlp.models",),
    ("vlp.objectives",),
    ("vlp.engine",),
    ("vlp.eval",),
    ("vlp.recipes", "vlp.tasks", "vlp.convert"),
    ("vlp.api", "vlp"),  # `vlp` itself: the package's __init__ (vlp.load)
    ("vlp.retrieval", "vlp.extract_regions"),
    ("vlp.cli", "vlp.__main__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The rank of the longest layer prefix `module` falls under."""
    matches = [(len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or (prefix != "vlp" and module.startswith(prefix + "."))]
    assert matches, f"{module} is in no layer of tests/test_layering.py: add it"
    return max(matches)[1]


def _imports(path: Path, modules: set[str]) -> set[tuple[str, str | None]]:
    """(imported vlp module, imported name or None) of every import in the file."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, None) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                # `from vlp.data import batch` imports a module; `from vlp.data import Batch` a name
                found.add((full, None) if full in modules else (base, alias.name))
    return {(m, n) for m, n in found if m == "vlp" or m.startswith("vlp.")}


def _graph():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return files, {m: _imports(p, modules) for m, p in files.items()}


def test_no_upward_imports():
    files, imports = _graph()
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in imports.items() for t, _ in targets
              if t in files and _layer(t) > _layer(m)]
    assert not upward, "\n".join(sorted(upward))


def test_no_private_imports():
    _, imports = _graph()
    private = [f"{m} imports {t}.{n}" for m, targets in imports.items() for t, n in targets
               if n and n.startswith("_") and not n.startswith("__") and t != m]
    assert not private, "\n".join(sorted(private))


def test_no_import_cycles():
    files, imports = _graph()
    edges = {m: {t for t, _ in targets if t in files and t != m and t != "vlp"}
             for m, targets in imports.items()}
    # Tarjan's strongly connected components
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """The walk itself: an upward, a private and a cyclic import in a tiny fake package are
    all found (so an empty result above means something)."""
    fake = tmp_path / "vlp"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "config.py").write_text("from vlp.data.a import x\n")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "a.py").write_text("def f():\n    from vlp.cli import main\n"
                                        "from vlp.data.b import _hidden\n")
    (fake / "data" / "b.py").write_text("from vlp.data import a\n")
    (fake / "cli.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    for check, words in ((test_no_upward_imports, "vlp.data.a (layer 1) imports vlp.cli"),
                         (test_no_private_imports, "vlp.data.a imports vlp.data.b._hidden"),
                         (test_no_import_cycles, "vlp.data.a <-> vlp.data.b")):
        try:
            check()
        except AssertionError as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"{check.__name__} found nothing in the fake package")
