"""Pictures of results: training curves, and a bundle's predictions against the truth.

* :func:`plot_history` draws the per-epoch curves of a fit (train and validation, one
  panel per metric) from a ``History``, its ``history`` dict, a fit's summary or a bundle.
* :func:`plot_predictions` runs a bundle on rows with a known target: for a regression a
  predicted-against-actual scatter and a residual histogram, for a classification a
  confusion matrix and ROC curves.

Both return a :class:`matplotlib.figure.Figure` made without ``pyplot`` (no GUI, no global
figure state: safe in scripts, servers and worker threads); ``path=`` also writes it (PNG,
SVG or PDF by the suffix, to any fsspec URL). In a notebook the figure shows as the cell's
result. matplotlib is imported only when a picture is drawn
(``pip install 'daskml_scale[notebook]'``).
"""

from __future__ import annotations

import io
import math
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from daskml_scale.exceptions import ArgumentError

__all__ = ["plot_history", "plot_predictions", "history_of", "curve_names", "prediction_pairs", "figure_png",
           "save_figure"]

# Entries a strategy adds to the epoch logs (counters, not curves to compare with a loss)
STRATEGY_PREFIXES = ("allreduce_", "ps_", "gossip_", "averaging_")


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Pictures need matplotlib: pip install 'daskml_scale[notebook]' (or matplotlib)") from exc
    _show_in_notebooks(Figure)
    return matplotlib


def _show_in_notebooks(figure_class: type) -> None:
    """In a Jupyter kernel, show a bare ``Figure`` as a PNG when it is a cell's result."""
    if "IPython" not in sys.modules:
        return
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    png = shell.display_formatter.formatters.get("image/png")
    if png is None:
        return
    try:
        png.lookup_by_type(figure_class)  # matplotlib's own inline support, when it is on
    except KeyError:
        png.for_type(figure_class, figure_png)


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (drawn with the Agg renderer)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def picture_format(path: str) -> str:
    """``"png"``, ``"svg"`` or ``"pdf"`` from the path's suffix; else an ArgumentError."""
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if fmt not in ("png", "svg", "pdf"):
        raise ArgumentError(f"Expected a picture path ending in .png, .svg or .pdf. Received: {path!r}")
    return fmt


def save_figure(fig: Any, path: str, *, storage_options: dict[str, Any] | None = None, dpi: int = 100) -> str:
    """Write ``fig`` to ``path`` (local or fsspec URL); the format comes from the suffix."""
    import fsspec

    fmt = picture_format(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(buf.getvalue())
    return path


# ------------------------------------------------------------------------------ curves
def history_of(obj: Any) -> dict[str, list[float]]:
    """The per-epoch ``{name: [values]}`` of a ``History``, a dict, a fit's summary
    (``history.daskml_summary``) or a :class:`~daskml_scale.bundle.Bundle`.

    Raises
    ------
    ArgumentError
        ``obj`` holds no per-epoch history (names what it is and what would work).
    """
    found: Any = None
    if hasattr(obj, "metadata") and isinstance(getattr(obj, "metadata"), dict):  # a Bundle
        summary = obj.metadata.get("training_summary") or {}
        found = summary.get("history") if isinstance(summary, dict) else None
        if found is None:
            raise ArgumentError(
                "Expected a bundle whose training summary holds the per-epoch history. Received: a bundle "
                "without one; save it with save_bundle(..., training_summary=history.daskml_summary)"
            )
    elif isinstance(getattr(obj, "history", None), dict):  # keras.callbacks.History
        found = obj.history
    elif isinstance(obj, Mapping):
        found = obj.get("history") if isinstance(obj.get("history"), Mapping) else obj
    if not isinstance(found, Mapping) or not found:
        raise ArgumentError(
            "Expected a History (what fit() returns), its .history dict, history.daskml_summary or a Bundle, "
            f"with at least one epoch. Received: {type(obj).__name__}"
        )
    out: dict[str, list[float]] = {}
    for k, v in found.items():
        if isinstance(v, (list, tuple, np.ndarray)):
            out[str(k)] = [float(x) if x is not None else math.nan for x in v]
    if not out:
        raise ArgumentError(f"Expected per-epoch lists of numbers. Received: keys {sorted(found)}")
    return out


def curve_names(history: Mapping[str, Sequence[float]], metrics: Sequence[str] | None = None) -> list[str]:
    """The panels to draw: ``metrics``, or every training entry (``loss`` first) that is
    not a strategy's counter, plus validation-only ones."""
    if metrics is not None:
        missing = [m for m in metrics if m not in history and f"val_{m}" not in history]
        if missing:
            raise ArgumentError(f"Expected metrics among {sorted(history)}. Received: {list(metrics)}")
        return list(metrics)
    names = []
    for k in history:
        base = k[4:] if k.startswith("val_") else k
        if base.startswith(STRATEGY_PREFIXES) or base in names:
            continue
        names.append(base)
    return sorted(names, key=lambda n: (n != "loss", names.index(n)))


def draw_history(fig: Any, history: Mapping[str, Sequence[float]], metrics: Sequence[str] | None = None,
                 title: str | None = None) -> list[Any]:
    """Draw the curves of ``history`` on ``fig`` (cleared first): one panel per metric,
    training and validation lines, epochs numbered from 1. Returns the axes."""
    fig.clear()
    names = curve_names(history, metrics)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for key, style, label in ((name, "o-", "train"), (f"val_{name}", "s--", "validation")):
            values = history.get(key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=label, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        n = max(len(history.get(name, [])), len(history.get(f"val_{name}", [])))
        if n <= 12:
            ax.set_xticks(range(1, n + 1))
    if title:
        fig.suptitle(title)
    return list(axes)


def plot_history(history: Any, *, metrics: Sequence[str] | None = None, title: str | None = None,
                 path: str | None = None, storage_options: dict[str, Any] | None = None) -> Any:
    """Training curves of a fit: one panel per metric, train and validation per epoch.

    Parameters
    ----------
    history : keras.callbacks.History, dict or Bundle
        What :func:`daskml_scale.fit` returns (also as ``history.plot()``), its
        ``.history`` dict, ``history.daskml_summary``, or a bundle saved with that summary.
    metrics : list of str, optional
        The panels (``["loss", "mae"]``); default: every metric the fit logged, without
        the strategy's counters (``allreduce_*``, ``ps_*``, ...).
    title : str, optional
    path : str, optional
        Also write the picture here (``.png``, ``.svg`` or ``.pdf``; any fsspec URL).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ArgumentError
        ``history`` holds no per-epoch values, or ``metrics`` names one it lacks.

    Examples
    --------
    >>> history = daskml_scale.fit(model, ddf, preprocessor=pre, epochs=5, validation_fraction=0.1)
    >>> history.plot()                                  # doctest: +SKIP
    >>> daskml_scale.plot_history(bundle, path="curves.png")  # doctest: +SKIP
    """
    if path:
        picture_format(path)  # before any work
    values = history_of(history)
    _matplotlib()
    from matplotlib.figure import Figure

    n = len(curve_names(values, metrics))
    fig = Figure(figsize=(4.2 * n, 3.4), layout="constrained")
    draw_history(fig, values, metrics, title)
    if path:
        save_figure(fig, path, storage_options=storage_options)
    return fig


# ------------------------------------------------------------------------------ predictions
def _rows(data: Any, max_rows: int, seed: int) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        df = data
    elif hasattr(data, "to_delayed") and hasattr(data, "npartitions"):  # a Dask DataFrame
        n = int(data.shape[0].compute()) if hasattr(data.shape[0], "compute") else len(data)
        frac = min(1.0, max_rows / max(n, 1))
        df = (data.sample(frac=frac, random_state=seed) if frac < 1.0 else data).compute()
    else:
        raise ArgumentError(
            f"Expected data to be a pandas or Dask DataFrame of rows with the target. Received: {type(data).__name__}"
        )
    if len(df) > max_rows:
        df = df.sample(n=max_rows, random_state=seed)
    return df


def prediction_pairs(bundle: Any, data: Any, *, max_rows: int = 50_000, seed: int = 0,
                     storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Truth and predictions of ``bundle`` on rows with a known target.

    Returns ``{"task", "y_true", "y_pred"}``; a classification also has ``"proba"``
    (rows x classes) and ``"classes"``, with ``y_true`` and ``y_pred`` class indices.
    Rows the transform drops, or without a target (under ``missing_target="drop"``),
    are left out, as in training.
    """
    if isinstance(bundle, str):
        from daskml_scale.bundle import load_bundle

        bundle = load_bundle(bundle, storage_options=storage_options)
    pre = bundle.preprocessor
    df = _rows(data, max_rows, seed)
    X, y = pre.transform(df)
    if y is None:
        raise ArgumentError(
            f"Expected rows with the target column {pre.target!r} (after the transform) to compare predictions "
            f"with. Received: columns {list(df.columns)}"
        )
    if len(y) == 0:
        raise ArgumentError("Expected rows with a target to compare predictions with. Received: none left")
    frame = bundle.outputs_to_frame(bundle.predict_array(X), pd.RangeIndex(len(y)))
    if bundle.task == "classification":
        classes = list(pre.classes_)
        proba = frame[[f"proba_{c}" for c in classes]].to_numpy(np.float64)
        return {"task": "classification", "classes": classes, "y_true": np.asarray(y, np.int64),
                "y_pred": proba.argmax(axis=1), "proba": proba}
    return {"task": "regression", "y_true": np.asarray(y, np.float64),
            "y_pred": frame[bundle.output_names[0]].to_numpy(np.float64)}


def regression_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    err = y_pred - y_true
    ss = float(np.sum((y_true - y_true.mean()) ** 2))
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2))),
            "r2": 1.0 - float(np.sum(err**2)) / ss if ss > 0 else math.nan}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def roc(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates over every threshold of ``score``, and the area."""
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], y_true[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each distinct score
    tp = np.cumsum(t)[last]
    fp = (last + 1) - tp
    pos, neg = int(t.sum()), int((~t).sum())
    tpr = np.r_[0.0, tp / pos] if pos else np.zeros(len(last) + 1)
    fpr = np.r_[0.0, fp / neg] if neg else np.zeros(len(last) + 1)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if pos and neg else math.nan
    return fpr, tpr, area


def plot_predictions(bundle: Any, data: Any, *, max_rows: int = 50_000, bins: int = 40, seed: int = 0,
                     path: str | None = None, storage_options: dict[str, Any] | None = None) -> Any:
    """How a bundle's predictions compare with the truth on rows with a known target.

    A regression gets a predicted-against-actual scatter (with the ``y = x`` line, MAE,
    RMSE and R² in the title) and a histogram of the residuals (actual - predicted); a
    classification a confusion matrix (counts, true class in rows) and ROC curves (the
    positive class for two classes, one-vs-rest for more) with their areas.

    Parameters
    ----------
    bundle : Bundle or str
        A loaded bundle, or its URL.
    data : pandas.DataFrame or dask.dataframe.DataFrame
        Raw rows with the target, as read (the bundle's transform runs first). A Dask
        frame is sampled down to ``max_rows`` rows (``seed``) and gathered.
    max_rows : int
        Most rows drawn.
    bins : int
        Bins of the residual histogram.
    path : str, optional
        Also write the picture here (``.png``, ``.svg`` or ``.pdf``; any fsspec URL).

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.daskml_scores`` holds the figures' numbers (``mae``, ``rmse``, ``r2``; or
        ``accuracy``, ``confusion``, ``auc`` per class).

    Raises
    ------
    ArgumentError
        The rows lack the target, or none is left after the transform.
    """
    if path:
        picture_format(path)
    pairs = prediction_pairs(bundle, data, max_rows=max_rows, seed=seed, storage_options=storage_options)
    _matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    y_true, y_pred = pairs["y_true"], pairs["y_pred"]
    if pairs["task"] == "regression":
        scores = regression_scores(y_true, y_pred)
        ax1.scatter(y_true, y_pred, s=6, alpha=0.4, linewidths=0)  # wait-bounded: matplotlib's scatter, not Dask's
        lo, hi = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
        ax1.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="predicted = actual")
        ax1.set_xlabel("actual")
        ax1.set_ylabel("predicted")
        ax1.set_title(f"MAE {scores['mae']:.4g}  RMSE {scores['rmse']:.4g}  R² {scores['r2']:.3f}")
        ax1.legend(fontsize="small")
        resid = y_true - y_pred
        ax2.hist(resid, bins=bins)
        ax2.axvline(0.0, color="k", linestyle="--", linewidth=1)
        ax2.set_xlabel("residual (actual - predicted)")
        ax2.set_ylabel("rows")
        ax2.set_title(f"residuals of {len(resid):,} rows")
    else:
        classes = pairs["classes"]
        k = len(classes)
        m = confusion(y_true, y_pred, k)
        scores = {"accuracy": float(np.trace(m) / m.sum()), "confusion": m.tolist(), "auc": {}}
        ax1.imshow(m, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax1.text(j, i, f"{m[i, j]:,}", ha="center", va="center",
                         color="white" if m[i, j] > m.max() / 2 else "black", fontsize="small")
        ax1.set_xticks(range(k), classes, rotation=45 if k > 4 else 0)
        ax1.set_yticks(range(k), classes)
        ax1.set_xlabel("predicted")
        ax1.set_ylabel("actual")
        ax1.set_title(f"confusion matrix, accuracy {scores['accuracy']:.3f}")
        shown = [1] if k == 2 else range(min(k, 10))
        for c in shown:
            fpr, tpr, area = roc(y_true == c, pairs["proba"][:, c])
            scores["auc"][classes[c]] = area
            ax2.plot(fpr, tpr, label=f"{classes[c]} (AUC {area:.3f})")
        ax2.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax2.set_xlabel("false positive rate")
        ax2.set_ylabel("true positive rate")
        ax2.set_title("ROC" + (" (one vs rest)" if k > 2 else f" (positive class {classes[1]!r})"))
        ax2.legend(fontsize="small", loc="lower right")
    fig.daskml_scores = scores
    if path:
        save_figure(fig, path, storage_options=storage_options)
    return fig
