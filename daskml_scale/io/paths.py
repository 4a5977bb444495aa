"""Where data lives: fsspec URLs, globs and folders as files, and the names users see.

One implementation for every reader and writer of the package: :func:`expand_paths`
turns what a user passed into (filesystem, files); :func:`display_name` gives a file
back as the user would write it (with its protocol unless local); :func:`output_paths`
maps input files to output files under a folder (``in/a/1.csv -> out/a/1.parquet``).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Sequence

import fsspec
from fsspec.core import get_fs_token_paths
from fsspec.utils import infer_compression

from daskml_scale.exceptions import ArgumentError, DataError

__all__ = [
    "CSV_SUFFIXES",
    "PARQUET_SUFFIXES",
    "INPUT_SUFFIXES",
    "FilePiece",
    "protocol",
    "is_local",
    "display_name",
    "expand_paths",
    "is_parquet",
    "files_under",
    "output_paths",
]

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
INPUT_SUFFIXES = CSV_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class FilePiece:
    """One partition's source: a byte range of one file.

    ``display`` is the file as the user would write it (see :func:`display_name`);
    ``length`` ``None`` reads to the end of the file.
    """

    path: str
    display: str
    start: int
    length: int | None  # None: to the end of the file
    compression: str | None

    @property
    def first(self) -> bool:
        """Whether the piece starts the file (then it holds the header line)."""
        return self.start == 0

    @classmethod
    def whole(cls, fs: fsspec.AbstractFileSystem, path: str, compression: str | None = "infer") -> FilePiece:
        """The whole file ``path`` of ``fs`` as one piece."""
        comp = infer_compression(path) if compression == "infer" else compression
        return cls(path, display_name(fs, path), 0, None, comp)


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's protocol (its first one: ``"file"``, ``"s3"``, ...)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem."""
    return protocol(fs) in ("file", "local")


def display_name(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` as a user would write it: with its protocol unless local."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def expand_paths(
    urlpath: str | Sequence[str], storage_options: dict[str, Any] | None = None, suffixes: Sequence[str] = CSV_SUFFIXES
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Expand a URL, glob, directory or list of them into (filesystem, files), in order.

    Globs (``*``, ``?`` and character classes such as ``part-0[01].csv``) and
    directories are sorted; an explicit list keeps the user's order. A name with ``?``
    or ``[`` that matches nothing as a glob is taken as it is, if such a file exists.

    Parameters
    ----------
    urlpath : str or list of str
        Local paths or fsspec URLs, globs or folders; every one on the filesystem of the first.
    storage_options : dict, optional
        Passed to fsspec.
    suffixes : sequence of str
        The files of a folder that count (``.csv``, ...): the others are left out.

    Returns
    -------
    (fsspec.AbstractFileSystem, list of str)
        The filesystem and the files' paths on it (without protocol).

    Raises
    ------
    DataError
        No path is given, a path matches no file, or a folder holds none with ``suffixes``.
    """
    urls = [urlpath] if isinstance(urlpath, str) else list(urlpath)
    if not urls:
        raise DataError("Expected at least one path. Received: an empty list")
    fs, _, _ = get_fs_token_paths(urls[0], storage_options=storage_options or {})
    out: list[str] = []
    for url in urls:
        _, _, paths = get_fs_token_paths(url, storage_options=storage_options or {})
        if len(paths) == 1 and _has_class_or_any(fs, paths[0]):  # fsspec globs only "*"
            paths = _glob(fs, paths[0])
        if not paths:
            raise DataError(f"No files match {url!r}", path=str(url))
        for p in paths:
            if fs.isdir(p):
                inside = sorted(f for f in fs.find(p) if f.endswith(tuple(suffixes)))
                if not inside:
                    raise DataError(f"Directory {url!r} holds no files ending in {list(suffixes)}", path=str(url))
                out.extend(inside)
            else:
                out.append(p)
    return fs, out


def _has_class_or_any(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` is a glob by a ``?`` or a ``[...]`` (on HTTP, ``?`` starts a query)."""
    if protocol(fs) in ("http", "https"):
        return False
    return "?" in path or ("[" in path and "]" in path[path.index("[") :])


def _glob(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    """The files ``pattern`` matches, sorted; the literal name when it matches none but exists."""
    found = fs.glob(pattern, detail=True)
    files = sorted(p for p, info in found.items() if info.get("type") != "directory")
    if not files and fs.exists(pattern):
        return [pattern]
    return files


def is_parquet(path: str) -> bool:
    """Whether ``path`` names a Parquet file (by its suffix)."""
    return path.endswith(PARQUET_SUFFIXES)


def files_under(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Every file under ``root`` (one listing, not one request per file); none if it is missing."""
    try:
        return {fs._strip_protocol(p) for p in fs.find(root)}
    except FileNotFoundError:
        return set()


def _output_name(rel: str, format: str) -> str:
    """``rel`` with its input suffix (and compression suffix) replaced by ``.<format>``."""
    comp = infer_compression(rel)
    if comp:
        rel = rel.rsplit(".", 1)[0]
    base, ext = posixpath.splitext(rel)
    if ext.lower() not in INPUT_SUFFIXES:
        base = rel
    return f"{base}.{format}"


def output_paths(paths: Sequence[str], output_dir: str, format: str) -> list[str]:
    """``output_dir/<path relative to the inputs' common folder, suffix changed>``, per input.

    Parameters
    ----------
    paths : sequence of str
        Input files (paths on one filesystem).
    output_dir : str
        The output folder, a path on the output filesystem.
    format : str
        The output suffix (``"csv"``, ``"parquet"``).

    Returns
    -------
    list of str

    Raises
    ------
    ArgumentError
        Two inputs map to the same output.
    """
    parents = [posixpath.dirname(p) for p in paths]
    try:
        common = posixpath.commonpath(parents)
    except ValueError:  # absolute and relative paths mixed
        common = ""
    outs = []
    for p in paths:
        rel = posixpath.relpath(p, common) if common else posixpath.basename(p)
        outs.append(f"{output_dir.rstrip('/')}/{_output_name(rel, format)}")
    if len(set(outs)) != len(outs):
        raise ArgumentError(f"Two input files map to the same output name under {output_dir!r}; rename the inputs")
    return outs
