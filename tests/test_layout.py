"""Imports run downhill (STYLE.md, convention 14) and modules stay small (convention 2).

The import graph is read from the source with :mod:`ast`; nothing in the package is
imported, so a cycle or a broken module cannot hide itself by failing to import.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "daskml_scale"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 600


@dataclass(frozen=True)
class Import:
    """One import statement (one name of a ``from ... import a, b``), resolved."""

    importer: str  # dotted name of the importing module
    target: str  # the module it resolves to (``from pkg import mod`` -> ``pkg.mod``)
    path: str  # the importer's file, relative to the package's parent folder
    line: int
    module_level: bool  # runs when the importer is imported: not in a function, not under TYPE_CHECKING
    root: bool  # reaches into the package root's namespace (``import pkg``, ``from pkg import NAME``)


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``__init__`` -> the package)."""
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]  # level 1 is the importer's own package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def build_imports(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> list[Import]:
    """Every import of a module of ``package`` made by a module of ``package``.

    Covers ``import a.b``, ``from a import b``, relative imports, imports inside
    functions and under ``if TYPE_CHECKING:`` (flagged as not module-level), and
    ``importlib.import_module("a.b")`` / ``__import__("a.b")`` with a literal name.
    """
    modules = module_files(package_dir, package)
    root_of = package_dir.parent
    found: list[Import] = []

    def internal(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        rel = str(path.relative_to(root_of))

        def add(target: str, node: ast.AST, module_level: bool, root: bool) -> None:
            if internal(target):
                found.append(Import(importer, target, rel, node.lineno, module_level, root))

        def visit(node: ast.AST, module_level: bool) -> None:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node, module_level, alias.name == package)
            elif isinstance(node, ast.ImportFrom):
                source = (
                    _resolve_relative(importer, is_package, node.level, node.module) if node.level else node.module or ""
                )
                for alias in node.names:
                    candidate = f"{source}.{alias.name}"
                    if alias.name != "*" and candidate in modules:
                        add(candidate, node, module_level, False)
                    else:
                        add(source, node, module_level, source == package)
            elif (
                isinstance(node, ast.Call)
                and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                    or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
                )
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and not node.args[0].value.startswith(".")
            ):
                add(node.args[0].value, node, module_level, node.args[0].value == package)

            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                # decorators and defaults run at import time, the body does not
                for child in [*getattr(node, "decorator_list", []), *node.args.defaults, *node.args.kw_defaults]:
                    if child is not None:
                        visit(child, module_level)
                body = node.body if isinstance(node.body, list) else [node.body]
                for child in body:
                    visit(child, False)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, False)
                for child in node.orelse:
                    visit(child, module_level)
            else:
                for child in ast.iter_child_nodes(node):
                    visit(child, module_level)

        visit(tree, True)
    return found


# Edges of the cycle check: importer -> the exact module an import resolves to, for
# module-level imports only. ``from pkg import name`` is ``pkg.name`` when that is a
# module, else ``pkg`` (the name comes out of pkg's __init__, which must then be done).
#
# No edge is added to the parent packages that Python initialises first (importing
# ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``). A package's __init__ importing its
# own submodules is the normal layout, and with those implicit edges every submodule
# that imports a sibling by its full name would form a cycle with its package's
# __init__. Leaving them out misses nothing that breaks: a submodule of a package whose
# __init__ is still running loads fine; what fails is using a name of a module that has
# not finished, and that always goes through an explicit edge (``from pkg import name``
# -> ``pkg``, ``from pkg.mod import name`` -> ``pkg.mod``).
def module_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set())
        graph.setdefault(imp.target, set())
        if imp.module_level and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a path that ends where it starts."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")  # pragma: no cover


def short(name: str, package: str = PACKAGE) -> str:
    return name[len(package) + 1 :] if name.startswith(package + ".") else name


def cycle_report(imports: list[Import], package: str = PACKAGE) -> list[str]:
    """One line per import cycle: the chain, then where each of its imports is."""
    graph = module_graph(imports)
    where = {}
    for imp in imports:
        if imp.module_level:
            where.setdefault((imp.importer, imp.target), f"{imp.path}:{imp.line}")
    lines = []
    for component in strongly_connected(graph):
        cycle = shortest_cycle(graph, component)
        chain = " -> ".join(short(m, package) for m in cycle)
        at = ", ".join(where[(a, b)] for a, b in zip(cycle, cycle[1:]))
        extra = f"; the cycle's component also holds {', '.join(short(m, package) for m in component if m not in cycle)}"
        lines.append(f"{chain} ({at}){extra if len(component) > len(set(cycle)) else ''}")
    return lines


def root_import_report(imports: list[Import], package: str = PACKAGE) -> list[str]:
    # the root's own __init__ is the namespace being built; it is not "importing the root"
    return [
        f"{short(imp.importer, package)} ({imp.path}:{imp.line}) imports the package root `{package}`"
        for imp in imports
        if imp.root and imp.importer != package
    ]


# ----------------------------------------------------------------------------- tests
def test_graph_builder_sees_the_package():
    """The layout tests below cannot pass by seeing nothing."""
    imports = build_imports()
    modules = module_files(PACKAGE_DIR, PACKAGE)
    assert len(modules) > 20 and f"{PACKAGE}.predict" in modules
    edges = {(i.importer, i.target) for i in imports if i.module_level}
    assert (f"{PACKAGE}.predict", f"{PACKAGE}.bundle") in edges
    # `from daskml_scale import config` is the submodule, not the root
    assert (f"{PACKAGE}.cluster", f"{PACKAGE}.config") in edges
    assert not [i for i in imports if i.importer == f"{PACKAGE}.cluster" and i.root]
    assert f"{PACKAGE}.bundle" in module_graph(imports)[f"{PACKAGE}.predict"]


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_graph_builder_rules_on_a_sample_package(tmp_path):
    pkg = _write_package(tmp_path, {
        "pkg/__init__.py": """\
            from pkg import a
            from pkg.sub import thing
            VERSION = "1"
            """,
        "pkg/a.py": """\
            from typing import TYPE_CHECKING
            from pkg import b
            from . import c

            if TYPE_CHECKING:
                from pkg.c import Hint

            def f():
                import pkg
            """,
        "pkg/b.py": """\
            import os
            from pkg.a import f
            """,
        "pkg/c.py": """\
            import importlib

            def g():
                from pkg.a import f
                return importlib.import_module("pkg.b")
            """,
        "pkg/sub/__init__.py": "from .inner import thing\n",
        "pkg/sub/inner.py": """\
            from .. import VERSION
            from ..c import g
            thing = 1
            """,
    })
    imports = build_imports(pkg, "pkg")
    got = {(i.importer, i.target, i.line, i.module_level, i.root) for i in imports}
    assert got == {
        ("pkg", "pkg.a", 1, True, False),
        ("pkg", "pkg.sub", 2, True, False),
        ("pkg.a", "pkg.b", 2, True, False),
        ("pkg.a", "pkg.c", 3, True, False),  # relative, resolved to the submodule
        ("pkg.a", "pkg.c", 6, False, False),  # under TYPE_CHECKING
        ("pkg.a", "pkg", 9, False, True),  # in a function
        ("pkg.b", "pkg.a", 2, True, False),
        ("pkg.c", "pkg.a", 4, False, False),
        ("pkg.c", "pkg.b", 5, False, False),  # importlib.import_module with a literal
        ("pkg.sub", "pkg.sub.inner", 1, True, False),
        ("pkg.sub.inner", "pkg", 1, True, True),  # `from .. import VERSION`: a name of the root
        ("pkg.sub.inner", "pkg.c", 2, True, False),
    }
    assert root_import_report(imports, "pkg") == [
        "a (pkg/a.py:9) imports the package root `pkg`",
        "sub.inner (pkg/sub/inner.py:1) imports the package root `pkg`",
    ]
    # a <-> b at module level is a cycle; c -> a only in a function, so it is not;
    # pkg's __init__ importing its submodules is not one either, but a submodule taking a
    # name out of the root's namespace while the root imports it is (VERSION is not yet set)
    assert cycle_report(imports, "pkg") == [
        "pkg -> sub -> sub.inner -> pkg (pkg/__init__.py:2, pkg/sub/__init__.py:1, pkg/sub/inner.py:1)",
        "a -> b -> a (pkg/a.py:2, pkg/b.py:2)",
    ]


def test_nothing_inside_the_package_imports_the_package_root():
    """``import daskml_scale`` or ``from daskml_scale import NAME`` (NAME not a submodule)
    inside the package runs the whole public namespace and ties every module to all others:
    import the module that defines NAME instead."""
    offenders = root_import_report(build_imports())
    assert not offenders, "imports of the package root from inside it:\n" + "\n".join(offenders)


def test_no_import_cycles():
    cycles = cycle_report(build_imports())
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


def test_modules_are_small():
    sizes = {
        short(name): len(path.read_text(encoding="utf-8").splitlines())
        for name, path in module_files(PACKAGE_DIR, PACKAGE).items()
    }
    big = [f"{name} ({n} lines)" for name, n in sorted(sizes.items()) if n > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines (split them by concept): " + ", ".join(big)
