"""The user's source code inside a bundle, as MLflow's ``code_paths``.

``save_bundle(..., code=[...])`` stores the source files of modules, module names,
``.py`` files or package folders under ``code/`` in the bundle (:func:`pack_code`).
Loading such a bundle runs that code, so it needs ``safe_mode=False``, as a Lambda
layer does; then :func:`install_code` writes the files to a private folder, makes
only the bundle's own top-level modules importable from it (the rest of
``sys.path`` is not shadowed), and imports them: their Keras registrations run
before the model loads, and the preprocessor's transform (stored by reference,
``module:fn``) is found by name on a machine where the module is not installed.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.abc
import importlib.machinery
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Iterable, Sequence, Union

from daskml_scale.exceptions import ArgumentError, BundleError, DaskmlScaleWarning, UnsafeBundleError

__all__ = ["CodeItem", "CODE_DIR", "pack_code", "install_code", "code_of", "unsafe_message", "refusing_transform"]

CodeItem = Union[ModuleType, str, "os.PathLike[str]"]
CODE_DIR = "code/"


def _arcname(module: str, package: bool) -> str:
    base = CODE_DIR + module.replace(".", "/")
    return base + "/__init__.py" if package else base + ".py"


def _package_files(folder: Path, name: str) -> dict[str, bytes]:
    files = {}
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        files[CODE_DIR + name.replace(".", "/") + "/" + rel.as_posix()] = path.read_bytes()
    return files


def _module_files(mod: ModuleType) -> tuple[str, dict[str, bytes]]:
    file = getattr(mod, "__file__", None)
    if not file:
        raise ArgumentError(
            f"Expected code= modules with source files. Received: module {mod.__name__!r}, which has none "
            "(built in, or a namespace package): pass the paths of its .py files or folders instead."
        )
    name = Path(file).stem if mod.__name__ == "__main__" else mod.__name__
    if hasattr(mod, "__path__"):
        files = _package_files(Path(file).parent, name)
    elif file.endswith(".py"):
        files = {_arcname(name, False): Path(file).read_bytes()}
    else:
        raise ArgumentError(
            f"Expected code= modules written in Python. Received: module {name!r} from {file!r} (compiled): "
            "install it on the machines that load the bundle instead."
        )
    parts = name.split(".")
    for i in range(1, len(parts)):  # a submodule needs its parent packages
        parent = sys.modules.get(".".join(parts[:i]))
        pfile = getattr(parent, "__file__", None)
        if pfile and pfile.endswith("__init__.py"):
            files.setdefault(_arcname(".".join(parts[:i]), True), Path(pfile).read_bytes())
    return name, files


def _item_files(item: Any) -> tuple[str, dict[str, bytes]]:
    if isinstance(item, ModuleType):
        return _module_files(item)
    if isinstance(item, (str, os.PathLike)):
        path = Path(os.fspath(item))
        if path.is_file() and path.suffix == ".py" and path.stem.isidentifier():
            return path.stem, {_arcname(path.stem, False): path.read_bytes()}
        if path.is_dir() and (path / "__init__.py").is_file() and path.name.isidentifier():
            return path.name, _package_files(path, path.name)
        text = os.fspath(item)
        if isinstance(item, str) and all(p.isidentifier() for p in text.split(".")) and not path.exists():
            try:
                return _module_files(importlib.import_module(text))
            except ImportError as exc:
                raise ArgumentError(f"Expected code= names of importable modules. Received: {text!r} ({exc})") from exc
    raise ArgumentError(
        "Expected code= to list modules, module names, .py files or package folders (with __init__.py). "
        f"Received: {item!r}"
    )


def pack_code(code: CodeItem | Sequence[CodeItem]) -> tuple[list[str], dict[str, bytes]]:
    """(the module names to import at load time, ``{path in the bundle: source bytes}``)
    for ``save_bundle(..., code=...)``."""
    items = [code] if isinstance(code, (ModuleType, str, os.PathLike)) else list(code)
    modules: list[str] = []
    files: dict[str, bytes] = {}
    for item in items:
        name, found = _item_files(item)
        for arc, data in found.items():
            if files.get(arc, data) != data:
                raise ArgumentError(f"Expected one source for {arc!r} in code=. Received: two different files.")
            files[arc] = data
        if name not in modules:
            modules.append(name)
    return modules, files


class _BundleFinder(importlib.abc.MetaPathFinder):
    """Finds the bundle's top-level modules in its folder, and nothing else: the rest of
    ``sys.path`` is not shadowed by the bundle's files."""

    def __init__(self, root: Path, names: Iterable[str]) -> None:
        self.root = str(root)
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.names:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.root])


_ROOTS: dict[str, Path] = {}
_ROOTS_LOCK = threading.Lock()


def _extract(files: dict[str, bytes], key: str, where: str) -> Path:
    with _ROOTS_LOCK:
        root = _ROOTS.get(key)
        if root is not None:
            return root
        rels = {arc: PurePosixPath(arc[len(CODE_DIR) :]) for arc in files}
        for arc, rel in rels.items():  # nothing may land outside the folder
            if not arc.startswith(CODE_DIR) or rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise BundleError(f"{where}: expected code files under {CODE_DIR!r}. Received: {arc!r}")
        root = Path(tempfile.mkdtemp(prefix="daskml-scale-code-"))
        atexit.register(shutil.rmtree, root, True)
        for arc, rel in rels.items():
            target = root.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(files[arc])
        tops = {rel.parts[0].removesuffix(".py") for rel in rels.values()}
        sys.meta_path.insert(0, _BundleFinder(root, tops))
        _ROOTS[key] = root
        return root


def install_code(code: dict[str, list[str]], parts: dict[str, bytes], *, key: str, where: str = "bundle") -> None:
    """Make a bundle's code (:func:`code_of`; its files' bytes in ``parts``) importable
    in this process, once per ``key``, and import its modules, so that their Keras
    registrations run. A module already imported from another source keeps that
    source, with a warning."""
    files = {f: parts[f] for f in code["files"]}
    _extract(files, key, where)
    for name in code["modules"]:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:
            raise BundleError(
                f"{where}: importing the bundle's code module {name!r} failed: {type(exc).__name__}: {exc}. "
                "Install what it imports, or save the bundle with the missing modules in code=[...]."
            ) from exc
        stored = files.get(_arcname(name, hasattr(mod, "__path__")))
        file = getattr(mod, "__file__", None)
        try:
            same = stored is None or (file is not None and Path(file).read_bytes() == stored)
        except OSError:
            same = False
        if not same:
            warnings.warn(
                f"{where}: module {name!r} was already imported from {file!r}, whose source differs from the "
                "bundle's copy; that one is used. Load the bundle in a fresh process to use its own code.",
                DaskmlScaleWarning, stacklevel=3,
            )


# ----------------------------------------------------------------- the bundle's side
def code_of(meta: dict[str, Any], parts: dict[str, bytes], where: str) -> dict[str, list[str]] | None:
    """``{"modules": [...], "files": [...]}``: the code a bundle holds (its
    ``metadata.json`` says), or None."""
    code = meta.get("code")
    if not code:
        return None
    files, modules = list(code.get("files") or []), list(code.get("modules") or [])
    missing = [f for f in files if f not in parts]
    if missing:
        raise BundleError(
            f"{where}: the bundle is incomplete: its metadata lists the code files {missing}, which it does not "
            "hold. Save it again with save_bundle()."
        )
    return {"modules": modules, "files": files}


def unsafe_message(where: str, code: dict[str, list[str]]) -> str:
    return (
        f"{where}: the bundle holds Python code ({', '.join(code['files'])}), which loading it would import and "
        "run, so safe loading refuses it. If you trust this bundle, pass safe_mode=False "
        "(load_bundle(url, safe_mode=False), serve(url, safe_mode=False); the CLI: --unsafe)."
    )


def _refuse(message: str, df: Any) -> Any:
    raise UnsafeBundleError(message)


def refusing_transform(message: str) -> Any:
    """A stand-in for a transform that lives in code safe mode does not import: the
    bundle can be described (``info()``), not used."""
    return functools.partial(_refuse, message)
