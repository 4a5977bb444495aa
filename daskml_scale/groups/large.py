"""Groups too large for one partition in :func:`~daskml_scale.groups.fit_groups`.

The shuffle brings each group's rows into one partition, which a worker holds in memory.
A group with more raw rows than ``max_group_rows`` would make one huge partition, so such
groups are counted first (one pass over the ``by`` columns: only counts reach the
client), left out of the shuffle, and each is trained with :func:`daskml_scale.fit`
over its rows where they already are: partition by partition on every worker, the rows
never brought together. Its model is the group's model like any other (the same
architecture and starting weights; trained data-parallel by ``fit``'s default strategy,
so not step for step what a single-process fit on the group would do).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Sequence

import numpy as np
import pandas as pd

from daskml_scale import backend, config
from daskml_scale.exceptions import ArgumentError
from daskml_scale.groups import plan

__all__ = ["DEFAULT_MAX_GROUP_ROWS", "large_groups", "max_group_rows_from", "split_large", "train_large"]

#: groups with more raw rows than this are trained data-parallel instead of in one partition
DEFAULT_MAX_GROUP_ROWS = 1_000_000


def max_group_rows_from(value: Any) -> int | None:
    """The threshold in effect: ``None`` takes ``daskml_scale.groups.max-group-rows``;
    ``"off"`` (or a null config value): no counting pass, every group is shuffled."""
    if value is None:
        value = config.get("groups.max-group-rows", DEFAULT_MAX_GROUP_ROWS)
        if value is None:
            return None
    if value == "off":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArgumentError(f"Expected max_group_rows to be a positive integer, 'off' or None. Received: {value!r}")
    return int(value)


def _partition_counts(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    counts = Counter(plan.key_json(k) for k in plan.row_keys(df, by) if k is not None)
    return pd.DataFrame({"key": pd.Series(list(counts), dtype=object),
                         "rows": pd.Series(list(counts.values()), dtype="int64")})


def large_groups(data: Any, by: Sequence[str], limit: int) -> dict[str, int]:
    """``key_json`` -> raw rows of every group with more than ``limit`` raw rows (one pass
    over the ``by`` columns; only the counts of those groups reach the client)."""
    meta = pd.DataFrame({"key": pd.Series(dtype=object), "rows": pd.Series(dtype="int64")})
    counts = data[list(by)].map_partitions(_partition_counts, list(by), meta=meta)
    totals = counts.groupby("key")["rows"].sum()
    over = totals[totals > limit].compute()
    return {str(k): int(v) for k, v in over.items()}


def _members(df: pd.DataFrame, by: Sequence[str], keys: frozenset[str], inside: bool) -> pd.DataFrame:
    hit = np.fromiter((k is not None and plan.key_json(k) in keys for k in plan.row_keys(df, by)),
                      dtype=bool, count=len(df))
    return df[hit if inside else ~hit]


def split_large(data: Any, by: Sequence[str], large: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    """The rows of the other groups (for the shuffle), and per large group a lazy frame
    of its rows (filtered partition by partition, in place)."""
    keys = frozenset(large)
    rest = data.map_partitions(_members, list(by), keys, False, meta=data._meta)
    frames = {k: data.map_partitions(_members, list(by), frozenset([k]), True, meta=data._meta) for k in sorted(large)}
    return rest, frames


def train_large(frames: dict[str, Any], build: Any, *, preprocessor: Any, epochs: int, batch_size: int,
                validation_fraction: float, client: Any, seed: int) -> list[dict[str, Any]]:
    """Every large group trained with :func:`daskml_scale.fit` in turn; results shaped as a
    partition task's (:func:`~daskml_scale.groups.worker.train_partition`)."""
    from daskml_scale.training import fit

    out = []
    for key, frame in frames.items():
        t0 = time.perf_counter()
        model = build()
        h = fit(model, frame, preprocessor=preprocessor, epochs=int(epochs), batch_size=batch_size,
                validation_fraction=validation_fraction or None, client=client, seed=seed, verbose=0)
        summary = getattr(h, "daskml_summary", {}) or {}
        loss = np.asarray(h.history.get("loss", [np.nan] * epochs), np.float64)[None, :]
        val = np.asarray(h.history.get("val_loss", [np.nan] * epochs), np.float64)[None, :]
        out.append({
            "keys": [key], "weights": [np.asarray(w)[None] for w in backend.get_weights(model)],
            "history": {"loss": loss, "val_loss": val},
            "rows": np.array([int(summary.get("train_rows", 0))], np.int64),
            "val_rows": np.array([int(summary.get("validation_rows", 0))], np.int64),
            "small": {}, "timings": {"train_s": time.perf_counter() - t0}, "large": True,
        })
    return out
