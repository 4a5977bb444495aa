"""A picture of a search (matplotlib, the ``tune`` extra): curves per trial, results over
time with the best so far, and the objective against each parameter."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

__all__ = ["plot_search"]

_COLORS = {"complete": "tab:blue", "pruned": "tab:orange", "failed": "tab:red", "running": "tab:gray"}


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("SearchResult.plot() needs matplotlib: pip install 'daskml_scale[tune]'") from exc
    import matplotlib.pyplot as plt

    return plt


def plot_search(trials: pd.DataFrame, objective: str, direction: str, space: Mapping[str, Any],
                best_trial: int | None) -> Any:
    """The figure of :meth:`SearchResult.plot`."""
    plt = _matplotlib()
    params = [n for n, p in space.items() if getattr(p, "distribution", None) is not None]
    params = [n for n in params if f"params_{n}" in trials.columns]
    ncols = max(2, min(4, len(params)))
    nrows = 1 + math.ceil(len(params) / ncols) if params else 1
    fig = plt.figure(figsize=(4 * ncols, 3.2 * nrows), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    half = max(1, ncols // 2)
    _curves(fig.add_subplot(grid[0, :half]), trials, objective, best_trial)
    _over_time(fig.add_subplot(grid[0, half:]), trials, objective, direction)
    for i, name in enumerate(params):
        ax = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        _per_param(ax, trials, objective, name, space[name], best_trial)
    done = trials[trials["state"].isin(["complete", "pruned"])]
    fig.suptitle(f"{len(trials)} trials ({(trials['state'] == 'complete').sum()} complete, "
                 f"{(trials['state'] == 'pruned').sum()} pruned, {(trials['state'] == 'failed').sum()} failed); "
                 f"{objective}: " + ("-" if done.empty else f"best {_best(done[objective], direction):.5g}"))
    return fig


def _best(values: pd.Series, direction: str) -> float:
    return float(values.min() if direction == "minimize" else values.max())


def _epoch_columns(trials: pd.DataFrame, objective: str) -> list[str]:
    prefix = f"{objective}_epoch_"
    cols = [c for c in trials.columns if isinstance(c, str) and c.startswith(prefix)]
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def _curves(ax: Any, trials: pd.DataFrame, objective: str, best_trial: int | None) -> None:
    cols = _epoch_columns(trials, objective)
    for _, row in trials.iterrows():
        values = row[cols].to_numpy(dtype=float) if cols else np.array([])
        keep = ~np.isnan(values)
        if not keep.any():
            continue
        epochs = np.arange(1, len(values) + 1)[keep]
        best = row["trial"] == best_trial
        ax.plot(epochs, values[keep], marker="o", ms=3, lw=2.5 if best else 1, alpha=1 if best else 0.6,
                color="black" if best else _COLORS.get(row["state"], "tab:gray"),
                label=f"best (trial {best_trial})" if best else None, zorder=3 if best else 2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(objective)
    ax.set_title("per trial, by epoch (orange: pruned)")
    if best_trial is not None:
        ax.legend(loc="best", fontsize=8)
    _robust_ylim(ax, trials[cols].to_numpy(dtype=float) if cols else np.array([]))


def _over_time(ax: Any, trials: pd.DataFrame, objective: str, direction: str) -> None:
    done = trials[trials["state"].isin(["complete", "pruned"]) & trials["finished"].notna()].copy()
    if done.empty:
        ax.set_title("no trial finished")
        return
    start = pd.to_datetime(trials["started"]).min()
    done["t"] = (pd.to_datetime(done["finished"]) - start).dt.total_seconds()
    done = done.sort_values("t")
    for state, part in done.groupby("state"):
        # wait-bounded: a matplotlib scatter plot, not a Dask scatter
        ax.scatter(part["t"], part[objective], s=14, color=_COLORS.get(state, "tab:gray"), label=state, zorder=2)
    values = done[objective].to_numpy(dtype=float)
    running = np.minimum.accumulate(values) if direction == "minimize" else np.maximum.accumulate(values)
    ax.step(done["t"], running, where="post", color="black", lw=1.5, label="best so far", zorder=3)
    ax.set_xlabel("seconds since the first trial started")
    ax.set_ylabel(objective)
    ax.set_title("each trial's result over time")
    ax.legend(loc="best", fontsize=8)
    _robust_ylim(ax, values)


def _per_param(ax: Any, trials: pd.DataFrame, objective: str, name: str, param: Any, best_trial: int | None) -> None:
    col = f"params_{name}"
    done = trials[trials["state"].isin(["complete", "pruned"])]
    x = done[col]
    numeric = pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x)
    if not numeric:
        labels = [str(v) for v in x]
        order = sorted(set(labels))
        xs = np.array([order.index(v) for v in labels], dtype=float)
        ax.set_xticks(range(len(order)), order, fontsize=8)
    else:
        xs = x.to_numpy(dtype=float)
    colors = [_COLORS.get(s, "tab:gray") for s in done["state"]]
    ax.scatter(xs, done[objective], s=14, c=colors)  # wait-bounded: a matplotlib scatter plot
    best = done[done["trial"] == best_trial]
    if not best.empty:
        bx = xs[np.flatnonzero(done["trial"].to_numpy() == best_trial)]
        # wait-bounded: a matplotlib scatter plot
        ax.scatter(bx, best[objective], s=60, facecolors="none", edgecolors="black", lw=1.5)
    if numeric and getattr(param, "log", False):
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(name)
    ax.set_ylabel(objective)
    _robust_ylim(ax, done[objective].to_numpy(dtype=float))


def _robust_ylim(ax: Any, values: np.ndarray) -> None:
    """Diverging trials do not squash the others: a log axis when the values span more than
    3x, else the axis stops a little past the 90th percentile."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if len(v) < 3:
        return
    if v.min() > 0 and v.max() / v.min() > 3:
        ax.set_yscale("log")
        return
    lo, hi = float(v.min()), float(np.percentile(v, 90))
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.25 * (hi - lo))
