"""What runs on a worker during a search: the data kept once per worker, and one epoch of
one trial.

The training partitions are prepared once by
:func:`~daskml_scale.training.worker.prepare_partition` (the same function ``fit`` uses)
and kept in the cluster. :func:`load_data` then gathers them into one array per worker
(the worker's memo, outside Dask's keys, so that the Active Memory Manager's replica
pruning does not take the copy away): every trial on that worker trains on it, and
no trial prepares or moves data again.

:func:`run_epoch` is a task of (trial parameters, state, epoch): it builds the trial's
model from the user's function on first use (cached on the worker for the next
epochs), sets the state the driver holds, trains one epoch over the worker's copy,
validates, and returns the logs and the new state. A worker lost mid-epoch costs that
epoch only: Dask reruns the task elsewhere from the same state. Errors of the user's
code (a bad combination of parameters, a NaN loss) come back as a result, not a
failed task: the driver records the trial as failed and the search goes on.
"""

from __future__ import annotations

import inspect
import math
import pickle
import threading
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from daskml_scale import backend
from daskml_scale._utils.lru import LRUCache
from daskml_scale.seeding import seeded
from daskml_scale.training.worker import _CachedModel, _worker_address

__all__ = ["pack_builder", "load_data", "run_epoch", "drop_search", "call_builder", "has_data", "loads"]

_DATA: LRUCache[str, dict[str, np.ndarray]] = LRUCache(2)
_TRIALS: LRUCache[str, _CachedModel] = LRUCache(8)
_BUILDERS: LRUCache[str, Callable[..., Any]] = LRUCache(4)
_PACK_TRAINERS: LRUCache[str, list[Any]] = LRUCache(8)  # architecture -> idle stacked trainers (pack_worker)
_DATA_LOCK = threading.Lock()
_LOADS = [0]  # copies of a search's data made by this process (tests check: one per worker per search)


# -------------------------------------------------------------------------- the builder
def pack_builder(fn: Callable[..., Any]) -> dict[str, Any]:
    """The user's ``build_model`` as it travels: by reference (a worker that can import
    its module uses it) and by value (cloudpickle) for workers that cannot."""
    from daskml_scale.custom_objects import _entry

    return _entry(getattr(fn, "__qualname__", "build_model"), fn, True)


def _unpack_builder(key: str, entry: Mapping[str, Any]) -> Callable[..., Any]:
    def load() -> Callable[..., Any]:
        from daskml_scale.custom_objects import _lookup

        problems = []
        if entry.get("module"):
            try:
                return _lookup(entry["module"], entry["qualname"])
            except Exception as exc:  # noqa: BLE001  (then by value)
                problems.append(f"importing {entry['module']}.{entry['qualname']}: {type(exc).__name__}: {exc}")
        if entry.get("value") is not None:
            return pickle.loads(entry["value"])
        raise RuntimeError("build_model could not be loaded on this worker: "
                           + "; ".join(problems + [entry.get("error") or "no copy of it was sent"]))

    return _BUILDERS.get_or_create(key, load)


def call_builder(fn: Callable[..., Any], style: str, params: Mapping[str, Any], context: Mapping[str, Any]) -> tuple[Any, Any]:
    """``fn(hp)`` (Keras Tuner style) or ``fn(params)`` (a dict space), with ``n_features=`` /
    ``preprocessor=`` when its signature names them. Returns ``(model, hp or None)``."""
    from daskml_scale.search.space import HyperParameters

    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        names = {}
    kwargs = {k: v for k, v in context.items() if k in names}
    if style == "hp":
        hp = HyperParameters(params)
        return fn(hp, **kwargs), hp
    return fn(dict(params), **kwargs), None


def check_model(model: Any) -> None:
    """A compiled Keras model, or an error saying what ``build_model`` returned."""
    if not hasattr(model, "get_weights"):
        raise TypeError(f"Expected build_model to return a compiled keras.Model. Received: {type(model).__name__}")
    if getattr(model, "optimizer", None) is None:
        raise TypeError("Expected build_model to return a compiled keras.Model. Received: a model without an "
                        "optimizer; call model.compile(optimizer=..., loss=...) in build_model")


# ----------------------------------------------------------------------------- the data
def load_data(search_id: str, train: Sequence[Mapping[str, np.ndarray]], validation: Sequence[Mapping[str, np.ndarray]] | None) -> dict[str, Any]:
    """Task (pinned to one worker): the prepared partitions -> this worker's copy of the
    search's training and validation rows (``validation=None``: the rows each partition
    held out). Returns the row counts."""

    def concat(parts: Sequence[Mapping[str, np.ndarray]], kx: str, ky: str) -> tuple[np.ndarray, np.ndarray]:
        xs = [p[kx] for p in parts if len(p[kx])]
        ys = [p[ky] for p in parts if len(p[ky])]
        if not xs:
            first = parts[0]
            return first[kx][:0], first[ky][:0]
        return np.ascontiguousarray(np.concatenate(xs)), np.ascontiguousarray(np.concatenate(ys))

    with _DATA_LOCK:
        data = _DATA.get(search_id)
        if data is None:
            X, y = concat(train, "X", "y")
            Xv, yv = concat(validation, "X", "y") if validation is not None else concat(train, "Xv", "yv")
            data = _DATA.put(search_id, {"X": X, "y": y, "Xv": Xv, "yv": yv})
            _LOADS[0] += 1
    return {"worker": _worker_address(), "train_rows": int(len(data["X"])), "validation_rows": int(len(data["Xv"])),
            "dropped": int(sum(int(p.get("dropped", 0)) for p in train))}


def has_data(search_id: str) -> bool:
    return search_id in _DATA


def loads() -> int:
    """How many times this worker process copied a search's data (once per search)."""
    return _LOADS[0]


def drop_search(search_id: str) -> None:
    """Forget the search's data and models on this worker (the search is over)."""
    _DATA.pop(search_id)
    for key in list(_TRIALS.keys()):
        if key.startswith(search_id + "/"):
            _TRIALS.pop(key)


# ---------------------------------------------------------------------------- the epoch
_QUIET = []


def _quiet_retracing() -> None:
    """Every trial is a new model, so TensorFlow's compiled loops are traced once per trial by
    design: its "triggered tf.function retracing" warning says nothing here (once per process)."""
    if not _QUIET:
        import logging

        logging.getLogger("tensorflow").addFilter(lambda r: "retracing" not in r.getMessage())
        _QUIET.append(True)


def _logs(model: Any) -> dict[str, float]:
    return backend.metric_results(model, backend.metric_state(model))


def _error(exc: BaseException, worker: str | None, t0: float) -> dict[str, Any]:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": "".join(tb), "worker": worker,
            "seconds": time.perf_counter() - t0}


def run_epoch(
    search_id: str,
    trial_key: str,
    builder: Mapping[str, Any],
    style: str,
    params: Mapping[str, Any],
    context: Mapping[str, Any],
    state: Mapping[str, Any] | None,
    epoch: int,
    *,
    batch_size: int,
    seed: int,
    layout: Any = None,
) -> dict[str, Any]:
    """Task: one epoch of one trial on this worker's copy of the data.

    Returns ``{"logs": {loss, metrics, val_*}, "state": {weights, optimizer}, "worker",
    "seconds", "declared"}``, ``{"error": ..., "traceback": ...}`` when the user's code
    failed or the loss is not finite, or ``{"missing_data": True}`` on a worker that has
    no copy of the data yet (one that joined after the search started).
    """
    t0 = time.perf_counter()
    _quiet_retracing()
    worker = _worker_address()
    data = _DATA.get(search_id)
    if data is None:
        return {"missing_data": True, "worker": worker}
    X, y, Xv, yv = data["X"], data["y"], data["Xv"], data["yv"]
    declared: dict[str, Any] = {}
    build_s = 0.0
    cached = _TRIALS.get(trial_key)
    if cached is None:
        tb = time.perf_counter()
        try:
            fn = _unpack_builder(f"{search_id}/builder", builder)
            with seeded(seed):  # equal for every trial of these params, whatever other threads draw
                model, hp = call_builder(fn, style, params, context)
            check_model(model)
            backend.set_input_layout(model, layout)  # a model with named inputs: X is cut into them
            backend.ensure_built(model, X[:2], y[:2])
        except Exception as exc:  # noqa: BLE001  (the user's code: the trial fails, the search goes on)
            return _error(exc, worker, t0)
        if hp is not None:
            declared = {n: p for n, p in hp.declared.items() if n not in params}
        cached = _TRIALS.put(trial_key, _CachedModel(model))
        build_s = time.perf_counter() - tb
    try:
        with cached.lock:
            model = cached.model
            # the model still holds the state after the previous epoch when that epoch ran here:
            # no assignment (and no trace of the assignment graph) then
            if state is not None and cached.extra.get("epoch_done") != epoch - 1:
                backend.set_weights(model, list(state["weights"]))
                if state.get("optimizer") is not None:
                    backend.set_optimizer_state(model, list(state["optimizer"]))
            cached.extra["epoch_done"] = None
            perm = np.random.default_rng([seed, 104729, epoch]).permutation(len(X))
            backend.reset_metrics(model)
            steps = cached.train(X[perm], y[perm], batch_size)
            logs = _logs(model)
            loss = logs.get("loss")
            if loss is None or not math.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss} after epoch {epoch + 1}: the trial diverged")
            if len(Xv):
                backend.reset_metrics(model)
                cached.eval_fn(Xv, yv, max(batch_size, 1024))
                logs.update({f"val_{k}": v for k, v in _logs(model).items()})
            out_state = {"weights": backend.get_weights(model), "optimizer": backend.get_optimizer_state(model)}
            cached.extra["epoch_done"] = epoch
    except Exception as exc:  # noqa: BLE001
        _TRIALS.pop(trial_key)
        return _error(exc, worker, t0)
    return {"logs": logs, "state": out_state, "worker": worker, "steps": int(steps), "declared": declared,
            "build_s": build_s, "seconds": time.perf_counter() - t0}
