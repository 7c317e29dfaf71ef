"""The package's import graph: lower layers never import higher ones, and there are no cycles.

Imports inside functions count too (a function-level import is how cycles hide). ``probes/`` is a
separate top-level package and may use only what ``vlmsafe`` exports publicly.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Layers, lowest first: the folders. A module may import modules of its own layer or lower ones only.
#: The longest matching prefix decides a module's layer; every prefix is a package (a folder), except that
#: ``vlmsafe`` itself (the core: errors, io, data, loading, ...) holds the top-level modules.
LAYERS: list[tuple[str, ...]] = [
    ("vlmsafe",),  # core
    ("vlmsafe.adapters",),
    ("vlmsafe.activations",),
    REMEDIES := ("vlmsafe.steering", "vlmsafe.merge", "vlmsafe.safeclip", "vlmsafe.eval", "vlmsafe.convert"),
    APPLICATION := ("vlmsafe.testbed", "vlmsafe.experiments", "vlmsafe.testing"),
    ("vlmsafe.demo", "probes"),
    ("vlmsafe.cli",),
]

#: What the library (core, adapters, activations, remedies) never imports: the testbeds, the demo, the
#: experiments and the test kit (open_clip / open_clip_train's split).
NOT_LIBRARY = (*APPLICATION, "vlmsafe.demo", "probes")


#: Edges being removed by work in progress; this set only ever shrinks (empty: the layers hold with no exception).
KNOWN_VIOLATIONS: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no layer; add it to LAYERS in tests/test_layering.py"
    return best


def source_modules() -> dict[str, Path]:
    files = [*ROOT.joinpath("vlmsafe").rglob("*.py"), *ROOT.joinpath("probes").rglob("*.py")]
    return {module_name(f): f for f in files}


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from a.b import c`` counts ``a.b.c`` if it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in known:
                out.add(name)
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    mods = source_modules()
    known = set(mods)
    return {m: imports_of(p, m, known) for m, p in mods.items()}


def test_no_import_from_a_higher_layer():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if f"{mod} -> {dep}" in KNOWN_VIOLATIONS:
                continue
            if layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "imports that go up a layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its submodules is not a cycle unless a submodule imports the package back
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles (counting imports inside functions):\n" + "\n".join(map(str, cycles))


def test_probes_use_only_public_vlmsafe_names():
    """``probes`` imports from ``vlmsafe`` packages' public surface, never from their internals."""
    bad = []
    for path in ROOT.joinpath("probes").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("vlmsafe"):
                continue
            parts = node.module.split(".")
            internal = len(parts) > 2 or any(p.startswith("_") for p in parts)
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            entry = f"{path.name}: from {node.module} import {', '.join(a.name for a in node.names)}"
            if (internal or private) and entry not in KNOWN_VIOLATIONS:
                bad.append(entry)
    assert not bad, "probes import vlmsafe internals (export them from the package instead):\n" + "\n".join(bad)


def test_layer_table_covers_every_module():
    for mod in source_modules():
        layer_of(mod)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def library_modules() -> dict[str, Path]:
    """The library: every ``vlmsafe`` module below the application layer."""
    return {m: p for m, p in source_modules().items() if layer_of(m) < LAYERS.index(APPLICATION)}


def test_remedies_never_import_testbed_demo_experiments_or_test_kit():
    """Checked on its own (not only through the layer numbers), so a reshuffled LAYERS cannot let it through."""
    known = set(source_modules())
    bad = [f"{m} imports {dep}" for m, p in library_modules().items() for dep in imports_of(p, m, known)
           if _under(dep, NOT_LIBRARY) and f"{m} -> {dep}" not in KNOWN_VIOLATIONS]
    assert not bad, "the library imports application code:\n" + "\n".join(sorted(bad))
    assert {"vlmsafe.steering", "vlmsafe.safeclip", "vlmsafe.eval", "vlmsafe.merge"} <= set(library_modules())


def test_no_library_module_is_a_script():
    """Scripts (``main()``, ``if __name__ == "__main__"``) live in the command line or the application layer."""
    bad = []
    for m, p in library_modules().items():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                bad.append(f"{m}: def main")
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                bad.append(f"{m}: if __name__ == '__main__'")
    bad = [b for b in bad if b not in KNOWN_VIOLATIONS]
    assert not bad, "library modules that are scripts:\n" + "\n".join(bad)


def test_library_finds_no_data_beside_its_source():
    """Bundled data is found through ``vlmsafe.resources`` (an installed wheel has no source tree to walk up)."""
    bad = [m for m, p in library_modules().items() if ".parents[" in p.read_text(encoding="utf-8")]
    assert not bad, f"library modules that walk up from __file__ (use vlmsafe.resources): {bad}"


def test_argparse_only_in_the_cli_package():
    """All argparse code is in ``vlmsafe/cli/``: the library raises errors naming parameters, the CLI names flags."""
    bad = []
    for path in [*ROOT.joinpath("vlmsafe").rglob("*.py"), *ROOT.joinpath("probes").rglob("*.py")]:
        if path.is_relative_to(ROOT / "vlmsafe" / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"argparse imported outside vlmsafe/cli: {sorted(set(bad))}"


#: Flags several commands share: each is written in exactly one ``add_argument`` call (a helper in
#: ``vlmsafe.cli.options`` every command calls), so its type, range and metavar cannot drift apart.
SHARED_FLAGS = ("--dtype", "--device", "--device-map", "--alpha", "--seed", "--batch-size", "--limit",
                "--max-new-tokens", "--no-progress")


def test_shared_flags_are_defined_once():
    where: dict[str, list[str]] = {flag: [] for flag in SHARED_FLAGS}
    for path in [*ROOT.joinpath("vlmsafe").rglob("*.py"), *ROOT.joinpath("probes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                    in ("add_argument", "add_input") and node.args):
                flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                for flag in set(flags) & set(SHARED_FLAGS):
                    where[flag].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    repeated = {flag: places for flag, places in where.items() if len(places) != 1}
    assert not repeated, f"shared flags defined more (or less) than once: {repeated}"
