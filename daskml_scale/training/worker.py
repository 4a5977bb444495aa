"""What runs on a worker: where a partition becomes training batches.

Every function here is a pure task of (weights, partitions): it can be rerun on any
worker after a loss. The worker keeps two memos, both safe to lose:

* the compiled model of a ``fit`` (built once per fit from ``.keras`` bytes, reused
  across rounds, keyed by the fit's id);
* in streaming mode, the last partitions it read (so consecutive rounds over one
  partition read it once).
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from daskml_scale import backend
from daskml_scale._utils.lru import LRUCache
from daskml_scale.exceptions import MissingColumnError

__all__ = [
    "PartSlice", "StreamRange", "Lazy", "prepare_partition", "train_round", "evaluate_parts", "model_for",
    "gather_rows", "sample_rows", "partition_sizes", "warm_model", "evaluate_here",
    "first_rows",
]


@dataclass(frozen=True)
class PartSlice:
    """Rows ``[start, stop)`` of partition ``part`` in its epoch-shuffled order."""

    part: int
    start: int
    stop: int

    @property
    def parts(self) -> tuple[int, ...]:
        return (self.part,)


@dataclass(frozen=True)
class StreamRange:
    """Rows ``[start, stop)`` of one epoch-wide permutation of ALL the rows of a
    worker's partitions (``parts``, concatenated in this order).

    This is how cached training shuffles: every round draws from every partition the
    worker holds, so data sorted by a key (dates, ids) across files still gives mixed
    batches, as a single process shuffling its whole array would.
    """

    parts: tuple[int, ...]
    start: int
    stop: int
    stream: int


class Lazy:
    """A partition's graph carried as a plain value, computed inside the task that
    needs it (so that a worker holds one partition at a time, not its whole share)."""

    def __init__(self, key: str, graph: Any) -> None:
        self.key = key
        self.graph = graph

    def compute(self) -> Any:
        import dask

        (value,) = dask.compute(self.graph, scheduler="sync")
        return value


# ------------------------------------------------------------------------ the model
class _CachedModel:
    def __init__(self, model: Any, build_s: float = 0.0) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.train_fn = backend.make_train_fn(model)
        self.eval_fn = backend.make_eval_fn(model)
        # seconds spent building the model from bytes, and in the first (tracing) train call
        self.timings: dict[str, float] = {"model_build_s": build_s}
        # what a strategy compiles once per fit on this worker (e.g. AllReduce's fused step)
        self.extra: dict[str, Any] = {}

    def train(self, X: np.ndarray, y: np.ndarray, batch_size: int) -> int:
        """``train_fn``, timing the first call (the trace) once."""
        if "first_train_call_s" in self.timings:
            return self.train_fn(X, y, batch_size)
        t = time.perf_counter()
        steps = self.train_fn(X, y, batch_size)
        self.timings["first_train_call_s"] = time.perf_counter() - t
        return steps

    @property
    def local_sgd(self) -> tuple[list[Any], Any]:
        """``(variables, fn)``: the model's weights and float32 optimizer slots, and
        ``backend.make_packed_train_fn`` over them (AllReduce, ``every > 1``; build the
        model first)."""
        got = self.extra.get("local_sgd")
        if got is None:
            model = self.model
            variables = list(model.weights) + [v for v in backend.optimizer_variables(model) if v.dtype == "float32"]
            got = self.extra["local_sgd"] = (variables, backend.make_packed_train_fn(model, variables))
        return got

    def train_round(self, X: np.ndarray, y: np.ndarray, batch_size: int, state: np.ndarray | None) -> np.ndarray:
        """``local_sgd``'s function, timing the first call (the trace) as :meth:`train` does."""
        fn = self.local_sgd[1]
        if "first_train_call_s" in self.timings:
            return fn(X, y, batch_size, state)
        t = time.perf_counter()
        out = fn(X, y, batch_size, state)
        self.timings["first_train_call_s"] = time.perf_counter() - t
        return out

    @property
    def fused_fn(self) -> Any:
        """``backend.make_fused_step_fn`` of the model (AllReduce, ``every=1``)."""
        fn = self.extra.get("fused")
        if fn is None:
            fn = self.extra["fused"] = backend.make_fused_step_fn(self.model)
        return fn

    @property
    def grad_loop_fn(self) -> Any:
        """``backend.make_gradient_loop_fn`` of the model (build the model first)."""
        fn = self.__dict__.get("_grad_loop_fn")
        if fn is None:
            fn = self._grad_loop_fn = backend.make_gradient_loop_fn(self.model)
        return fn


_MODELS: LRUCache[str, _CachedModel] = LRUCache(2)
_BUILT_COUNT = [0]


def model_for(fit_id: str, model_bytes: bytes) -> _CachedModel:
    """The worker's compiled copy of the fit's model, built on first use."""

    def build() -> _CachedModel:
        from daskml_scale.custom_objects import load_shipped_model

        t = time.perf_counter()
        model = load_shipped_model(model_bytes)  # bytes (and custom objects) made by our own driver
        _BUILT_COUNT[0] += 1
        return _CachedModel(model, time.perf_counter() - t)

    return _MODELS.get_or_create(fit_id, build)


def warm_model(
    fit_id: str, model_bytes: bytes, X: np.ndarray, y: np.ndarray, batch_size: int, functions: Sequence[str],
    validate: bool,
) -> dict[str, float]:
    """Task: build the fit's model on this worker and trace the compiled functions its
    strategy will call, on placeholder rows, while the driver still prepares the data.

    The model's state (weights, optimizer slots, metrics) is put back afterwards, so
    that the placeholder steps leave no trace; every training task sets it anyway."""
    t = time.perf_counter()
    cached = model_for(fit_id, model_bytes)
    with cached.lock:
        model = cached.model
        backend.ensure_built(model, X, y)
        # the state (weights, every optimizer variable) is read before and put back after,
        # one eager assignment a variable: the traced assignment of set_weights costs more
        # (~0.07 s to trace) than it saves on one call, and a strategy that assigns state
        # in its own compiled round (local SGD) never calls it
        variables = [*model.weights, *backend.optimizer_variables(model)]
        before = [np.array(v.numpy()) for v in variables]
        X, y = X[:1], y[:1]
        if "train" in functions:
            cached.train(X, y, batch_size)
        if "local_sgd" in functions:
            cached.train_round(X, y, batch_size, None)
        if "gradients" in functions:
            cached.grad_loop_fn(X, y, batch_size, backend.pack(before[: len(model.weights)]))
        if "fused" in functions:
            cached.fused_fn(X, y, None)
        if validate:
            cached.eval_fn(X, y, batch_size)
        backend.assign_values(variables, before)
        backend.reset_metrics(model)
    cached.timings["warm_s"] = time.perf_counter() - t
    return dict(cached.timings)


def models_built() -> int:
    """How many models this worker process has built (tests check it is one per fit)."""
    return _BUILT_COUNT[0]


# ------------------------------------------------------------------- the partitions
def prepare_partition(df: Any, preprocessor: Any, val_fraction: float, seed: int, index: int) -> dict[str, Any]:
    """A raw partition -> training and held-out arrays (split deterministically).

    ``"dropped"`` counts the rows left out for a missing target
    (``Preprocessor(missing_target="drop")``); an error about a row names its file
    and line when the partition was read from a file.
    """
    X, y, dropped = preprocessor.transform_training(df)
    if y is None:
        raise MissingColumnError(
            f"The target column {preprocessor.target!r} is missing from the training data",
            column=preprocessor.target,
        )
    if val_fraction > 0:
        held = np.random.default_rng([seed, 7919, index]).random(len(X)) < val_fraction
        return {"X": X[~held], "y": y[~held], "Xv": X[held], "yv": y[held], "dropped": dropped}
    return {"X": X, "y": y, "Xv": X[:0], "yv": y[:0], "dropped": dropped}


_PARTS: LRUCache[str, dict[str, np.ndarray]] = LRUCache(2)


def _materialize(source: Any) -> dict[str, np.ndarray]:
    if not isinstance(source, Lazy):
        return source  # already arrays (cached mode: Dask passed the persisted result)
    return _PARTS.get_or_create(source.key, source.compute)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int, part: int) -> np.ndarray:
    # cached: a stream reads one partition in many small slices (the parameter server)
    perm = np.random.default_rng([seed, epoch, part]).permutation(n)
    perm.flags.writeable = False
    return perm


@functools.lru_cache(maxsize=4)
def _stream_permutation(n: int, seed: int, epoch: int, stream: int, parts: tuple[int, ...]) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch, 15485863, stream, *parts]).permutation(n)
    perm.flags.writeable = False
    return perm


def _gather_stream_range(r: StreamRange, sources: dict[int, Any], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    arrays = [_materialize(sources[p]) for p in r.parts]
    sizes = np.array([len(a["X"]) for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    idx = _stream_permutation(int(starts[-1]), seed, epoch, r.stream, r.parts)[r.start : r.stop]
    owner = np.searchsorted(starts, idx, side="right") - 1
    first = arrays[0]
    X = np.empty((len(idx),) + first["X"].shape[1:], dtype=first["X"].dtype)
    y = np.empty((len(idx),) + first["y"].shape[1:], dtype=first["y"].dtype)
    for k, a in enumerate(arrays):
        mask = owner == k
        if mask.any():
            local = idx[mask] - starts[k]
            X[mask] = a["X"][local]
            y[mask] = a["y"][local]
    return X, y


def gather_rows(
    slices: Sequence[PartSlice | StreamRange], sources: dict[int, Any], seed: int, epoch: int, shuffle: bool
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for s in slices:
        if isinstance(s, StreamRange):
            X, y = _gather_stream_range(s, sources, seed, epoch)
            xs.append(X)
            ys.append(y)
            continue
        arrays = _materialize(sources[s.part])
        X, y = arrays["X"], arrays["y"]
        if shuffle:
            idx = _permutation(len(X), seed, epoch, s.part)[s.start : s.stop]
            xs.append(X[idx])
            ys.append(y[idx])
        else:
            xs.append(X[s.start : s.stop])
            ys.append(y[s.start : s.stop])
    if not xs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(xs), np.concatenate(ys)


# -------------------------------------------------------------------------- the tasks
def train_round(
    fit_id: str,
    model_bytes: bytes,
    state: dict[str, Any],
    slices: Sequence[PartSlice],
    sources: dict[int, Any],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> dict[str, Any]:
    """Train the worker's model copy from ``state`` over ``slices``; return the result.

    Returns weights, optimizer state, metric state (sums) and the number of samples.
    """
    X, y = gather_rows(slices, sources, seed, epoch, shuffle)
    cached = model_for(fit_id, model_bytes)
    with cached.lock:
        model = cached.model
        if len(X) == 0:
            return {"samples": 0}
        backend.ensure_built(model, X, y)
        backend.set_weights(model, state["weights"])
        if state.get("optimizer") is not None:
            backend.set_optimizer_state(model, state["optimizer"])
        backend.reset_metrics(model)
        steps = cached.train(X, y, batch_size)
        return {
            "samples": int(len(X)),
            "steps": steps,
            "weights": backend.get_weights(model),
            "optimizer": backend.get_optimizer_state(model),
            "metrics": backend.metric_state(model),
            "worker": _worker_address(),
            "timings": cached.timings,
        }


def evaluate_parts(
    fit_id: str,
    model_bytes: bytes,
    weights: list[np.ndarray],
    parts: Sequence[int],
    sources: dict[int, Any],
    *,
    batch_size: int,
    rows: str = "held-out",
) -> dict[str, Any]:
    """Metric state (sums) of the model at ``weights`` over rows of ``parts``: the rows
    held out of training (``rows="held-out"``), or all of them (``"all"``: partitions of
    separate validation data, prepared with nothing held out)."""
    cached = model_for(fit_id, model_bytes)
    with cached.lock:
        return _evaluate(cached, parts, sources, batch_size, rows, weights)


def evaluate_here(cached: _CachedModel, validation: dict[str, Any]) -> dict[str, Any]:
    """:func:`evaluate_parts` at the weights ``cached``'s model holds now, inside a task
    that already holds its lock (a strategy's epoch task that ends on the weights the
    driver keeps); ``validation`` is what ``EpochRunner.validation_for`` gave the task."""
    return _evaluate(cached, validation["parts"], validation["sources"], validation["batch_size"],
                     validation["rows"], None)


def _evaluate(cached: _CachedModel, parts: Sequence[int], sources: dict[int, Any], batch_size: int, rows: str,
              weights: list[np.ndarray] | None) -> dict[str, Any]:
    kx, ky = ("Xv", "yv") if rows == "held-out" else ("X", "y")
    model = cached.model
    if weights is not None and model.built:
        backend.set_weights(model, weights)
    samples = 0
    first = True
    for p in parts:
        arrays = _materialize(sources[p])
        X, y = arrays[kx], arrays[ky]
        if len(X) == 0:
            continue
        if first:
            backend.ensure_built(model, X, y)
            if weights is not None:
                backend.set_weights(model, weights)
            backend.reset_metrics(model)
            first = False
        cached.eval_fn(X, y, batch_size)
        samples += len(X)
    if first:
        return {"samples": 0}
    return {"samples": samples, "metrics": backend.metric_state(model)}


def first_rows(blocks: Sequence[Sequence[PartSlice | StreamRange]], sources: dict[int, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Two rows of the first partition that ``blocks`` read (a model is built on them),
    without gathering a block; None when there is none or it has no rows."""
    first = next((s for b in blocks for s in b), None)
    if first is None:
        return None
    arrays = _materialize(sources[first.parts[0]])
    return (arrays["X"][:2], arrays["y"][:2]) if len(arrays["X"]) else None


def sample_rows(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two training rows of a prepared partition (the driver builds its model on them)."""
    a = _materialize(source)
    return a["X"][:2], a["y"][:2]


def partition_sizes(source: Any) -> tuple[int, int, int]:
    """Training rows, held-out rows, and rows dropped for a missing target."""
    arrays = _materialize(source)
    return int(len(arrays["X"])), int(len(arrays["Xv"])), int(arrays.get("dropped", 0))


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:
        return None
