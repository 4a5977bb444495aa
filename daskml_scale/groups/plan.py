"""Group keys, held-out rows and batches: everything that decides which rows train which
model, as pure functions of the data, the seed and the group's key.

* A key is the tuple of a row's values in the ``by`` columns, normalized so that the
  same group compares equal whether it came from a CSV shard, a pandas frame or a JSON
  request: an integral number is an ``int`` (``7``, ``7.0`` and ``"7"`` from an
  integer column are one key), another number a ``float``, anything else a ``str``;
  a missing value makes the row belong to no group.
* :func:`held_out` and :func:`epoch_order` draw from a generator seeded by
  ``(seed, crc32 of the key)``: a group's split and batches are the same on any worker,
  in any partition, next to any other groups, which is what makes a stacked fit equal
  a separate single-process fit of the same group (tests rely on it).
* :func:`stacked_plan` lays the batches of many groups out for one program: groups by
  decreasing steps per epoch, so those still training at step ``s`` are a prefix.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "Key", "normalize_column", "row_keys", "key_json", "key_crc", "held_out", "epoch_order", "stacked_plan",
    "eval_plan", "display_key",
]

Key = tuple


def normalize_column(values: pd.Series) -> np.ndarray:
    """The column as an object array of normalized key parts (``None`` where missing)."""
    s = values
    if pd.api.types.is_bool_dtype(s.dtype):
        out = np.asarray(s.astype(object), dtype=object)
        return np.array([None if v is None or v is pd.NA else int(bool(v)) for v in out], dtype=object)
    if pd.api.types.is_numeric_dtype(s.dtype):
        x = s.to_numpy(dtype=np.float64, na_value=np.nan)
        out = np.empty(len(x), dtype=object)
        finite = np.isfinite(x)
        integral = finite & (np.floor(x) == x) & (np.abs(x) < 2**53)
        out[:] = None
        if integral.any():
            out[integral] = x[integral].astype(np.int64).tolist()
        other = finite & ~integral
        if other.any():
            out[other] = x[other].tolist()
        return out
    missing = s.isna().to_numpy()
    text = s.astype(object).to_numpy()
    out = np.empty(len(text), dtype=object)
    for i, (v, m) in enumerate(zip(text, missing)):
        out[i] = None if m else _normalize_scalar(v)
    return out


def _normalize_scalar(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not np.isfinite(f):
            return None
        return int(f) if f.is_integer() and abs(f) < 2**53 else f
    return str(v)


def normalize_key(key: Any, n_columns: int) -> Key:
    """A user's key (a scalar for one column, a tuple for several) normalized as rows are."""
    parts = key if isinstance(key, (tuple, list)) else (key,)
    if len(parts) != n_columns:
        raise ValueError(f"Expected a key of {n_columns} values (one per `by` column). Received: {key!r}")
    return tuple(_normalize_scalar(p) for p in parts)


def row_keys(df: pd.DataFrame, by: Sequence[str]) -> list[Key | None]:
    """Per row, its normalized key tuple, or ``None`` when a ``by`` value is missing."""
    cols = [normalize_column(df[c]) for c in by]
    if len(cols) == 1:
        return [None if v is None else (v,) for v in cols[0]]
    return [None if any(v is None for v in t) else tuple(t) for t in zip(*cols)]


def key_json(key: Key) -> str:
    return json.dumps(list(key), separators=(",", ":"))


def key_crc(key: Key) -> int:
    return zlib.crc32(key_json(key).encode("utf-8"))


def display_key(key: Key) -> Any:
    """The key as a user writes it: the value for one column, the tuple for several."""
    return key[0] if len(key) == 1 else tuple(key)


def held_out(n: int, fraction: float, seed: int, key: Key) -> np.ndarray:
    """Which of a group's ``n`` rows (in their original order) are held out for validation."""
    if fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    mask = np.random.default_rng([seed, 7919, key_crc(key)]).random(n) < fraction
    if mask.all():
        mask[0] = False  # every group keeps a training row
    return mask


def epoch_order(n: int, seed: int, epoch: int, key: Key, shuffle: bool = True) -> np.ndarray:
    """The order of a group's ``n`` training rows in ``epoch``; batches are consecutive runs."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 104729, key_crc(key)]).permutation(n)


def stacked_plan(
    orders: Sequence[np.ndarray], offsets: Sequence[int], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of many groups as ``(idx, active, steps)``.

    ``orders[g]`` are group ``g``'s training rows in batch order (positions within the
    group), ``offsets[g]`` where the group's rows start in the flat array. The groups
    must come by decreasing number of rows. ``idx[s, g]`` are the flat rows of group
    ``g``'s batch ``s`` (``-1`` pads a short last batch); ``active[s]`` is how many
    groups (a prefix) have a batch ``s``; ``steps[g]`` is group ``g``'s steps per epoch.
    """
    g = len(orders)
    steps = np.array([-(-len(o) // batch_size) for o in orders], dtype=np.int32)
    if g and np.any(np.diff(steps) > 0):
        raise ValueError("Expected the groups by decreasing number of rows")
    n_steps = int(steps.max()) if g else 0
    idx = np.full((n_steps, g, batch_size), -1, dtype=np.int32)
    for j, (order, off) in enumerate(zip(orders, offsets)):
        n = len(order)
        padded = np.full(steps[j] * batch_size, -1, dtype=np.int64)
        padded[:n] = np.asarray(order, dtype=np.int64) + off
        idx[: steps[j], j, :] = padded.reshape(steps[j], batch_size)
    active = np.array([(steps > s).sum() for s in range(n_steps)], dtype=np.int32)
    return idx, active, steps


def eval_plan(counts: Sequence[int], offsets: Sequence[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Batches over every group's held-out rows (any group order): ``(idx, active)``,
    every group active at every step (padding rows are masked)."""
    g = len(counts)
    if g == 0 or max(counts, default=0) == 0:
        return np.zeros((0, g, 1), np.int32), np.zeros(0, np.int32)
    width = int(min(batch_size, max(counts)))
    n_steps = int(-(-max(counts) // width))
    idx = np.full((n_steps, g, width), -1, dtype=np.int32)
    for j, (n, off) in enumerate(zip(counts, offsets)):
        padded = np.full(n_steps * width, -1, dtype=np.int64)
        padded[:n] = np.arange(off, off + n)
        idx[:, j, :] = padded.reshape(n_steps, width)
    return idx, np.full(n_steps, g, dtype=np.int32)
