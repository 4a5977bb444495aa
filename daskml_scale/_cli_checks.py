"""Checks of ``daskml-scale``'s arguments made before any pass over the data."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["output_problem"]


def output_problem(url: str, storage_options: dict[str, Any], *, folder: bool) -> str | None:
    """Why ``url`` cannot be written, or ``None``.

    Locally: it must not be a folder (for a ``folder``: a file), and its nearest existing
    parent folder must be writable. Elsewhere: the URL's filesystem must be known, with
    the storage options given.
    """
    import fsspec

    from daskml_scale.io.paths import is_local

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except (ValueError, ImportError, TypeError) as exc:
        return f"cannot write there: {exc}"
    if not is_local(fs):
        return None
    path = os.path.abspath(path)
    if not folder and os.path.isdir(path):
        return f"is a folder: expected a file name, e.g. {os.path.join(url, 'model.bundle')}"
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return "is a file: expected a folder"
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write there ({parent} is not a writable folder)"
    return None
