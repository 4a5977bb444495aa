"""NumPy and Keras values as plain JSON types (one rule for the CLI, jobs and serving)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["jsonable", "json_default"]


def json_default(o: Any) -> Any:
    """The ``default=`` of ``json.dumps``: NumPy scalars and arrays as Python values."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "item") and getattr(o, "shape", None) == ():
        return o.item()  # a 0-d tensor
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def jsonable(value: Any) -> Any:
    """``value`` with every container walked and NumPy / tensor scalars made Python values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value
