"""What runs on a worker in :func:`~daskml_scale.groups.fit_groups`: one task per
partition of the shuffled data (every partition holds whole groups).

The task prepares its partition (the user's transform, the global statistics of the
Preprocessor), splits every group's rows into training and held-out rows, and trains
every group of at least ``min_rows`` rows:

* ``"stacked"``: all of them together, one compiled program
  (:meth:`~daskml_scale.backend.base.Backend.make_stacked_trainer`), traced once per
  process for an architecture;
* ``"loop"``: one group after the other through the model's own compiled train step,
  traced once per process, the group's weights and a fresh optimizer state assigned
  before each group.

It returns the groups' trained weights, stacked, their history and their row counts:
no row leaves the worker. A task is pure: Dask reruns it elsewhere when its worker dies,
and each group is trained by the task whose result is kept, exactly once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from daskml_scale import backend
from daskml_scale._utils.lru import LRUCache
from daskml_scale.dropped_rows import kept_rows
from daskml_scale.exceptions import MissingColumnError
from daskml_scale.groups import plan
from daskml_scale.groups.scaling import apply_group_scaling, group_statistics
from daskml_scale.groups.spec import stack_plan
from daskml_scale.target import missing_rows

__all__ = ["ROW_KEY", "GroupTask", "train_partition", "prepare_groups", "add_row_key"]

ROW_KEY = "__daskml_row__"


@dataclass
class GroupTask:
    """The arguments every partition's task shares (small; the model travels apart)."""

    fit_id: str
    by: list[str]
    preprocessor: Any
    epochs: int
    batch_size: int
    validation_fraction: float
    min_rows: int
    seed: int
    shuffle: bool
    mode: str  # "stacked" or "loop"
    initial_weights: list[np.ndarray]
    per_group_scaling: bool = False


def add_row_key(df: pd.DataFrame, partition_info: dict[str, Any] | None = None) -> pd.DataFrame:
    """The partition with a column giving every row's place in the input (partition, row):
    after the shuffle, a group's rows are put back in their input order."""
    number = int((partition_info or {}).get("number", 0))
    out = df.copy(deep=False)
    out[ROW_KEY] = (np.int64(number) << np.int64(32)) + np.arange(len(df), dtype=np.int64)
    return out


# ------------------------------------------------------------------ the partition
def prepare_groups(df: pd.DataFrame, task: GroupTask) -> dict[str, Any]:
    """The partition as flat arrays, grouped: ``keys`` (sorted), per group its rows'
    ``start`` in ``X``/``y``, ``count``, and the user's transform already applied."""
    pre = task.preprocessor
    missing = [c for c in task.by if c not in df.columns]
    if missing:
        raise MissingColumnError(f"The group column {missing[0]!r} is missing; the data has columns {list(df.columns)}",
                                 column=missing[0])
    if ROW_KEY in df.columns:
        df = df.sort_values(ROW_KEY, kind="stable")
    df = df.reset_index(drop=True)
    kept = pre._apply_user_transform(df)
    order, rows = kept_rows(df.index, kept.index)
    if order is not None:
        kept = kept.iloc[order]
    source = kept if all(c in kept.columns for c in task.by) else df.iloc[rows if rows is not None else slice(None)]
    keys = plan.row_keys(source, task.by)
    if pre.target is None or pre.target not in kept.columns:
        raise MissingColumnError(f"The target column {pre.target!r} is missing from the training data",
                                 column=pre.target)
    valid = np.array([k is not None for k in keys], dtype=bool)
    if pre.missing_target == "drop":
        valid &= ~missing_rows(kept[pre.target])
    kept = kept[valid]
    keys = [k for k, v in zip(keys, valid) if v]
    plain = _features_only(pre)
    X, y, _ = plain.transform_training(kept)
    if len(keys) == 0:
        return {"keys": [], "start": np.zeros(0, np.int64), "count": np.zeros(0, np.int64), "X": X, "y": y}
    # group the rows: a stable sort by group keeps each group's rows in input order
    if len(task.by) == 1:
        values = np.empty(len(keys), dtype=object)
        values[:] = [k[0] for k in keys]
    else:
        values = np.array([plan.key_json(k) for k in keys], dtype=object)
    codes, _ = pd.factorize(values)
    perm = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first = np.concatenate([[0], np.flatnonzero(np.diff(codes[perm])) + 1]) if len(perm) else np.zeros(0, np.int64)
    group_keys = [keys[int(perm[i])] for i in first]
    return {"keys": group_keys, "start": starts.astype(np.int64), "count": counts.astype(np.int64),
            "X": X[perm], "y": np.asarray(y)[perm]}


def _features_only(pre: Any) -> Any:
    import copy

    plain = copy.copy(pre)
    plain.transform_fn = None
    plain._transform_missing = None
    return plain


# ------------------------------------------------------------------ the model
class _Worker:
    """What a worker keeps for one fit: the template model and its compiled functions."""

    def __init__(self, model_bytes: bytes) -> None:
        from daskml_scale.custom_objects import load_shipped_model

        self.model = load_shipped_model(model_bytes)
        self.lock = threading.Lock()
        self.spec, self.why = stack_plan(self.model)
        self.train_fn: Any = None
        self.eval_fn: Any = None
        self.optimizer0: list[np.ndarray] = []


_FITS: LRUCache[str, _Worker] = LRUCache(2)
_TRAINERS: LRUCache[str, Any] = LRUCache(2)  # architecture key -> stacked trainer (one trace per process)


def _worker_for(fit_id: str, model_bytes: bytes) -> _Worker:
    return _FITS.get_or_create(fit_id, lambda: _Worker(model_bytes))


def _trainer(spec: Any) -> Any:
    return _TRAINERS.get_or_create(spec.key, lambda: backend.current().make_stacked_trainer(spec))


# ------------------------------------------------------------------ the task
def train_partition(df: pd.DataFrame, model_bytes: bytes, task: GroupTask) -> dict[str, Any]:
    """Task: train every group of the partition; the result holds no rows.

    Returns ``keys`` (trained groups, in a stable order), ``weights`` (one array per
    model weight, ``(groups, *shape)``), ``history`` (``loss``, ``val_loss`` arrays of
    ``(groups, epochs)``), ``rows`` / ``val_rows`` per trained group, ``small`` (key ->
    rows, the groups under ``min_rows``) and ``timings``.
    """
    t0 = time.perf_counter()
    from daskml_scale.io.provenance import name_rows

    data = name_rows(prepare_groups, df, task)
    t_prep = time.perf_counter() - t0
    worker = _worker_for(task.fit_id, model_bytes)
    trainable: list[int] = []
    small: dict[str, int] = {}
    for i, (k, n) in enumerate(zip(data["keys"], data["count"])):
        if n >= task.min_rows:
            trainable.append(i)
        else:
            small[plan.key_json(k)] = int(n)
    # per group: training rows in order and held-out rows, positions in the flat arrays
    groups = []
    for i in trainable:
        key, start, n = data["keys"][i], int(data["start"][i]), int(data["count"][i])
        held = plan.held_out(n, task.validation_fraction, task.seed, key)
        pos = np.arange(start, start + n)
        groups.append((key, pos[~held], pos[held]))
    result: dict[str, Any] = {"small": small, "keys": [plan.key_json(g[0]) for g in groups],
                              "rows": np.array([len(g[1]) for g in groups], np.int64),
                              "val_rows": np.array([len(g[2]) for g in groups], np.int64)}
    if task.per_group_scaling:
        data, result["scaling"] = _scale_groups(data, groups, task.preprocessor)
    with worker.lock:
        if not groups:
            weights, loss, val = [np.zeros((0, *np.shape(w)), np.float32) for w in task.initial_weights], None, None
        elif task.mode == "stacked":
            if worker.spec is None:
                raise ValueError(f"The model cannot be trained stacked: {worker.why}")
            weights, loss, val = _train_stacked(worker, data, groups, task)
        else:
            weights, loss, val = _train_loop(worker, data, groups, task)
    e = task.epochs
    result["weights"] = weights
    result["history"] = {
        "loss": loss if loss is not None else np.zeros((len(groups), e), np.float32),
        "val_loss": val if val is not None else np.full((len(groups), e), np.nan, np.float32),
    }
    result["timings"] = {"prepare_s": t_prep, "train_s": time.perf_counter() - t0 - t_prep}
    result["worker"] = _worker_address()
    return result


def _scale_groups(data: dict[str, Any], groups: list[Any], pre: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every trained group's rows rescaled by the statistics of its training rows
    (:mod:`daskml_scale.groups.scaling`); the statistics, in the groups' order."""
    cols = list(pre.numeric)
    gm = np.array([pre.means_[c] for c in cols], np.float64)
    gs = np.array([pre.scales_[c] for c in cols], np.float64)
    means, scales = group_statistics(data["X"], [g[1] for g in groups], gm, gs)
    codes = np.full(len(data["X"]), -1, np.int64)
    for j, (_, tr, va) in enumerate(groups):
        codes[tr] = j
        codes[va] = j
    sel = np.flatnonzero(codes >= 0)
    X = np.array(data["X"], np.float32, copy=True)
    X[sel] = apply_group_scaling(X[sel], codes[sel], means, scales, gm, gs)
    return {**data, "X": X}, {"means": means, "scales": scales}


def _train_stacked(worker: _Worker, data: dict[str, Any], groups: list[Any], task: GroupTask) -> tuple[Any, Any, Any]:
    """Every group at once. The program's group axis runs by decreasing training rows."""
    X, y = data["X"], data["y"].astype(np.float32)
    n_groups = len(groups)
    by_size = sorted(range(n_groups), key=lambda j: (-len(groups[j][1]), j))
    # the flat training rows of the groups in program order, and their held-out rows
    train_pos = [groups[j][1] for j in by_size]
    val_pos = [groups[j][2] for j in by_size]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in train_pos])[:-1]]).astype(np.int64)
    Xt = X[np.concatenate(train_pos)] if n_groups else X[:0]
    yt = y[np.concatenate(train_pos)] if n_groups else y[:0]
    v_counts = [len(p) for p in val_pos]
    v_offsets = np.concatenate([[0], np.cumsum(v_counts)[:-1]]).astype(np.int64)
    Xv = X[np.concatenate(val_pos)] if sum(v_counts) else X[:0]
    yv = y[np.concatenate(val_pos)] if sum(v_counts) else y[:0]
    v_idx, v_active = plan.eval_plan(v_counts, v_offsets, max(task.batch_size, 256))
    trainer = _trainer(worker.spec)
    trainer.load([np.broadcast_to(w, (n_groups, *np.shape(w))) for w in task.initial_weights])
    counts = np.array([len(p) for p in train_pos], np.float64)
    loss = np.zeros((n_groups, task.epochs), np.float32)
    val = np.full((n_groups, task.epochs), np.nan, np.float32)
    keys = [groups[j][0] for j in by_size]
    for epoch in range(task.epochs):
        orders = [plan.epoch_order(len(p), task.seed, epoch, k, task.shuffle) for p, k in zip(train_pos, keys)]
        idx, active, steps = plan.stacked_plan(orders, offsets, task.batch_size)
        sums = trainer.train_epoch(Xt, yt, idx, active, steps, epoch)
        loss[:, epoch] = sums / np.maximum(counts, 1)
        if len(Xv):
            vs = trainer.evaluate(Xv, yv, v_idx, v_active)
            with np.errstate(invalid="ignore", divide="ignore"):
                val[:, epoch] = np.where(np.array(v_counts) > 0, vs / np.maximum(np.array(v_counts), 1), np.nan)
    back = np.argsort(by_size)  # program order -> the groups' order
    return [w[back] for w in trainer.weights()], loss[back], val[back]


def _train_loop(worker: _Worker, data: dict[str, Any], groups: list[Any], task: GroupTask) -> tuple[Any, Any, Any]:
    """One group after the other through one traced train step (weights passed in)."""
    model = worker.model
    X, y = data["X"], data["y"]
    backend.ensure_built(model, X[:2], y[:2])
    if worker.train_fn is None:
        worker.train_fn = backend.make_train_fn(model)
        worker.eval_fn = backend.make_eval_fn(model)
        # the optimizer as compiled, before any step (its step count, learning rate, zero slots)
        worker.optimizer0 = backend.get_optimizer_state(model)
    opt0 = worker.optimizer0
    n = len(groups)
    loss = np.zeros((n, task.epochs), np.float32)
    val = np.full((n, task.epochs), np.nan, np.float32)
    out: list[list[np.ndarray]] = []
    for j, (key, tr, va) in enumerate(groups):
        backend.set_weights(model, task.initial_weights)
        backend.set_optimizer_state(model, opt0)
        Xg, yg = X[tr], y[tr]
        for epoch in range(task.epochs):
            order = plan.epoch_order(len(tr), task.seed, epoch, key, task.shuffle)
            backend.reset_metrics(model)
            worker.train_fn(Xg[order], yg[order], task.batch_size)
            loss[j, epoch] = _loss_of(model)
            if len(va):
                backend.reset_metrics(model)
                worker.eval_fn(X[va], y[va], max(task.batch_size, 256))
                val[j, epoch] = _loss_of(model)
        out.append(backend.get_weights(model))
    weights = [np.stack([w[i] for w in out]) for i in range(len(task.initial_weights))]
    return weights, loss, val


def _loss_of(model: Any) -> float:
    logs = backend.metric_results(model, backend.metric_state(model))
    return float(logs.get("loss", np.nan))


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:
        return None


def stack_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The tasks' results as one: keys in task order, weights and history concatenated."""
    keys: list[str] = []
    weights: list[list[np.ndarray]] = []
    loss, val, rows, val_rows = [], [], [], []
    means, scales = [], []
    small: dict[str, int] = {}
    for r in results:
        keys += r["keys"]
        weights.append(r["weights"])
        loss.append(r["history"]["loss"])
        val.append(r["history"]["val_loss"])
        rows.append(r["rows"])
        val_rows.append(r["val_rows"])
        small.update(r["small"])
        if "scaling" in r:
            means.append(r["scaling"]["means"])
            scales.append(r["scaling"]["scales"])
    stacked = [np.concatenate([w[i] for w in weights]) for i in range(len(weights[0]))] if weights else []
    return {"keys": keys, "weights": stacked, "loss": np.concatenate(loss) if loss else None,
            "val_loss": np.concatenate(val) if val else None, "rows": np.concatenate(rows) if rows else None,
            "val_rows": np.concatenate(val_rows) if val_rows else None, "small": small,
            "scaling": (np.concatenate(means), np.concatenate(scales)) if means else None}
