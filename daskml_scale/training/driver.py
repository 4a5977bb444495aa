"""The driver side of ``fit``: planning, the epoch loop, validation, callbacks, checkpoints.

The driver holds the master state (weights, optimizer slots, history). Workers get
pure tasks of (state, partition slices); when a worker dies Dask reruns its task on
another worker, and partitions it held are recomputed from their source. Strategies
drive each epoch through :class:`~daskml_scale.training.runner.EpochRunner`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import types
import uuid
from typing import Any, Callable, Sequence

import dask
import numpy as np

from daskml_scale import backend, config
from daskml_scale.exceptions import DataError, TrainingError, WorkersLostError
from daskml_scale.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from daskml_scale.training.runner import EpochRunner, sum_states
from daskml_scale.training.strategy import Strategy
from daskml_scale.training.worker import (
    Lazy,
    evaluate_parts,
    partition_sizes,
    prepare_partition,
    sample_rows,
    warm_model,
)

logger = logging.getLogger(__name__)

__all__ = ["Fit", "EpochRunner", "wait_done"]


class Fit:
    """One call of :func:`daskml_scale.fit`, from planning to the last epoch."""

    def __init__(
        self, *, client: Any, model: Any, data: Any, preprocessor: Any, strategy: Strategy, epochs: int,
        batch_size: int, validation_data: Any, validation_fraction: float, callbacks: list[Any],
        checkpoint: str | None, resume: bool, seed: int, verbose: Any, cache: Any,
        storage_options: dict[str, Any] | None, shuffle: bool,
    ) -> None:
        self.client = client
        self.model = model
        self.data = data
        self.pre = preprocessor
        self.strategy = strategy
        self.epochs = epochs
        self.batch_size = batch_size
        self.validation_data = validation_data
        self.validation_fraction = validation_fraction
        self.user_callbacks = callbacks
        self.checkpoint = checkpoint
        self.resume = resume
        self.seed = seed
        self.verbose = verbose
        self.cache = cache
        self.storage_options = storage_options
        self.shuffle = shuffle
        self.fit_id = f"fit-{uuid.uuid4().hex[:8]}"
        self.strategy_state: Any = strategy.create_state()
        # the cluster
        self.workers: list[str] = []
        self.homes: list[str] = []
        self.lost_workers: set[str] = set()
        self._live: list[str] = []
        self._known: set[str] = set()
        # the plan (set by _plan)
        self.sources: list[Any] = []
        self.cached = False
        self.train_sizes: list[int] = []
        self.val_sizes: list[int] = []
        self.dropped_missing_target = 0
        self.streams: list[list[int]] = []
        self.val_sources: list[Any] | None = None
        self.val_streams: list[list[int]] = []
        # the model and the master state (set by _put_model and _take_state)
        self.model_bytes: Any = None
        self.weights: list[np.ndarray] = []
        self.optimizer_state: list[np.ndarray] = []
        self.initial_optimizer_state: list[np.ndarray] = []
        self.trainable_mask: list[bool] = []
        self.callbacks: Any = None
        self._warm: list[Any] = []  # the warm-up tasks (their results: worker timings)
        self._size_futures: list[Any] | None = None  # the partitions' sizes, submitted with them
        # per epoch, validation answers its strategy's tasks computed (EpochRunner.validated)
        self.validated: dict[int, list[dict[str, Any]]] = {}
        # where the time before the first step goes (history.daskml_summary["timings"])
        self.timings: dict[str, float] = {}
        self._worker_timings: dict[str, float] = {}

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        """Train; whatever happens, release what the fit put in the cluster."""
        try:
            return self._run()
        finally:
            self._release()

    def _run(self) -> Any:
        t0 = time.perf_counter()
        workers = self.live_workers()
        if not workers:
            raise WorkersLostError("The cluster has no workers: start some, or call daskml_scale.connect()")
        # the data's preparation is submitted first, so that workers start on it while the
        # driver builds and serializes the model; the warm-up (build and trace the model on
        # every worker) then comes before the partitions still queued (a higher priority)
        self._submit_sources(workers)
        t1 = time.perf_counter()
        warm = self._warm_up(workers)
        self.timings["model_s"] = time.perf_counter() - t1
        self._plan(workers)
        self.timings["plan_s"] = time.perf_counter() - t0 - self.timings["model_s"]
        if not warm:
            t2 = time.perf_counter()
            self._ship_model()
            self.timings["model_s"] += time.perf_counter() - t2
        start_epoch, restored = self._restore()
        history = self._start_callbacks(start_epoch, restored)
        self.timings["before_first_epoch_s"] = time.perf_counter() - t0
        logs = self._train_epochs(start_epoch, history, t0)
        if self.optimizer_state:  # the driver's model leaves with the trained optimizer too
            backend.set_optimizer_state(self.model, self.optimizer_state)
        self.callbacks.on_train_end(logs)
        history.daskml_summary = self.summary(history)
        from daskml_scale.plots import plot_history

        history.plot = types.MethodType(plot_history, history)  # history.plot(): the curves
        return history

    def _submit_sources(self, workers: list[str]) -> None:
        """The prepared partitions (training and validation), submitted, not waited for."""
        self.workers = workers
        self.homes = list(workers)
        self.sources, self.cached = self._sources(self.data, self.validation_fraction, "train", workers)
        if self.validation_data is not None:  # prepared while the training partitions are counted
            self.val_sources, _ = self._sources(self.validation_data, 0.0, "val", workers)
        # counted as soon as each is prepared, ahead of the warm-up (a higher priority): the
        # plan is then ready while the workers trace the model, and the first epoch's tasks
        # are submitted behind the warm-up rather than a round trip after it
        self._size_futures = self._submit_sizes(self.sources, self.cached, workers)

    def _plan(self, workers: list[str]) -> None:
        """The prepared partitions' sizes, the streams."""
        sizes = self._sizes(self.sources, self.cached, workers)
        self.train_sizes = [s[0] for s in sizes]
        self.val_sizes = [s[1] for s in sizes]
        self.dropped_missing_target = sum(s[2] for s in sizes)
        if sum(self.train_sizes) == 0:
            raise DataError("Expected training rows. Received: 0 rows after reading and preprocessing the data")
        self.streams = self._assign(self.train_sizes, len(workers))
        if self.val_sources is not None:
            self.val_streams = [list(range(i, len(self.val_sources), len(workers))) for i in range(len(workers))]
        elif self.validation_fraction > 0:
            self.val_streams = self.streams

    def _placeholder_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Two rows of the preprocessor's output for Dask's placeholder input rows (their
        shapes and dtypes are the real ones), or None when the user's transform does not
        run on placeholders."""
        meta = getattr(self.data, "_meta_nonempty", None)
        if meta is None:
            return None
        try:
            X, y = self.pre.transform(meta.head(2))
        except Exception:
            return None
        if y is None or len(X) == 0:
            return None
        return X, y

    def _warm_up(self, workers: list[str]) -> bool:
        """Ship the model and have every worker build it and trace what the strategy will
        call (:func:`~daskml_scale.training.worker.warm_model`), ahead of the data."""
        sample = self._placeholder_rows()
        if sample is None:
            return False
        self._put_model(sample[0])
        validate = self.validation_data is not None or self.validation_fraction > 0
        self._warm = [
            self.client.submit(
                warm_model, self.fit_id, self.model_bytes, sample[0], sample[1], self.batch_size,
                self.strategy.worker_functions(), validate, pure=False, workers=[w], allow_other_workers=True,
                priority=10, key=f"daskml-warm-{self.fit_id}-{i}",
            )
            for i, w in enumerate(workers)
        ]
        self._take_state(*sample)  # while the workers build and trace
        return True

    def _ship_model(self) -> None:
        """Build the driver's model on rows of the biggest partition, put it in the cluster
        and take the master state from it (the fit without a warm-up)."""
        biggest = self.sources[int(np.argmax(self.train_sizes))]
        X, y = self.gather([self.client.submit(sample_rows, biggest, pure=False)])[0]
        self._put_model(X)
        self._take_state(X, y)

    def _put_model(self, X: np.ndarray) -> None:
        """Build the driver's model (weights and optimizer slots) for rows like ``X`` and put
        it in the cluster once (:func:`~daskml_scale.custom_objects.ship_model`)."""
        from daskml_scale.custom_objects import ship_model

        backend.build_model(self.model, X)
        self.model_bytes = self.put(ship_model(self.model), "model")

    def _take_state(self, X: np.ndarray, y: np.ndarray) -> None:
        """The master state from the driver's model, its metrics built too (an eager test
        step: after the model was put, so the workers need not wait for it)."""
        backend.ensure_built(self.model, X, y)
        self.weights = backend.get_weights(self.model)
        trainable = {id(v) for v in self.model.trainable_weights}
        self.trainable_mask = [id(v) in trainable for v in self.model.weights]
        self.optimizer_state = backend.get_optimizer_state(self.model)
        self.initial_optimizer_state = self.optimizer_state

    def _restore(self) -> tuple[int, Checkpoint | None]:
        if not (self.checkpoint and self.resume):
            return 0, None
        restored = load_checkpoint(self.checkpoint, self.storage_options)
        if restored is None:
            return 0, None
        self._check_restorable(restored)
        self.weights = restored.weights
        if restored.optimizer is not None:
            self.optimizer_state = restored.optimizer
        return restored.epoch + 1, restored

    def _start_callbacks(self, start_epoch: int, restored: Checkpoint | None) -> Any:
        import keras

        progbar = self._progbar()
        callbacks = list(self.user_callbacks)
        if progbar and self.verbose == "auto":  # in a notebook, the live view instead of text
            from daskml_scale.live import LivePlot, in_notebook

            if in_notebook():
                callbacks += [] if any(isinstance(c, LivePlot) for c in callbacks) else [LivePlot()]
                progbar = False
        if config.get("dashboard.enabled", True):  # the daskml page of the Dask dashboard
            from daskml_scale.dashboard import FitReporter

            callbacks.append(FitReporter(self.client, self.fit_id, self.describe()))
        self.callbacks = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=progbar, model=self.model,
            verbose=1 if progbar else 0, epochs=self.epochs, steps=self.rounds_per_epoch(),
            daskml={"workers": list(self.homes),  # what LivePlot shows: rows per worker's stream
                    "stream_rows": [int(sum(self.train_sizes[p] for p in s)) for s in self.streams]},
        )
        self.model.stop_training = False
        self.callbacks.on_train_begin()
        history = self.model.history
        if restored is not None:
            history.history = {k: list(v) for k, v in restored.history.items()}
            history.epoch = list(range(start_epoch))
        return history

    def _train_epochs(self, start_epoch: int, history: Any, t0: float) -> dict[str, float]:
        logs: dict[str, float] = {}
        for epoch in range(start_epoch, self.epochs):
            self.callbacks.on_epoch_begin(epoch)
            runner = EpochRunner(self, epoch)
            self.strategy.run_epoch(runner)
            if epoch == start_epoch:
                self.timings["first_epoch_end_s"] = time.perf_counter() - t0
            logs = runner.train_logs()
            logs.update(self.strategy.epoch_logs(runner))
            self.live_workers()  # notes workers lost during the epoch
            validating = self.val_sources is not None or self.validation_fraction > 0
            finish_validation = self.start_validation(epoch) if validating else None
            backend.set_weights(self.model, self.weights)  # while the workers validate
            if finish_validation is not None:
                logs.update(finish_validation())
            self.callbacks.on_epoch_end(epoch, logs)
            if self.checkpoint:
                save_checkpoint(
                    self.checkpoint,
                    Checkpoint(epoch, self.weights, self.optimizer_state, dict(history.history),
                               info={"fit": self.describe()}),
                    self.storage_options,
                )
            if self.model.stop_training:
                break
        return logs

    def _release(self) -> None:
        try:
            self.strategy.release(self.strategy_state)
        except Exception:  # pragma: no cover - releasing must not hide the fit's own error
            logger.exception("daskml_scale.fit: the strategy could not release its state")
        futures = [s for s in self.sources if not isinstance(s, Lazy)]
        futures += [s for s in (self.val_sources or []) if not isinstance(s, Lazy)]
        futures += self._size_futures or []  # a fit that failed before its plan counted them
        for f in futures + self._warm + [self.model_bytes]:
            try:
                if f is not None and hasattr(f, "release"):
                    f.release()
            except Exception:
                pass

    # ------------------------------------------------------------------ planning
    def _sources(self, ddf: Any, val_fraction: float, tag: str, workers: list[str]) -> tuple[list[Any], bool]:
        """Prepared partitions: computed and kept in the cluster (partition ``i`` on worker
        ``i % n``, the worker of the stream it starts in), or lazy when they do not fit."""
        parts = ddf.to_delayed()
        if not parts:
            raise DataError("Expected training data with at least one partition. Received: an empty DataFrame")
        prepared = [
            dask.delayed(prepare_partition, pure=True)(p, self.pre, val_fraction, self.seed, i, dask_key_name=f"{tag}-prep-{self.fit_id}-{i}")
            for i, p in enumerate(parts)
        ]
        cache = self.cache
        if cache == "auto":
            cache = self._fits_in_memory(len(parts))
        if cache:
            # placement by index, not by whichever worker is free: the streams, and so the
            # trained weights, depend on the seed and the data only, never on scheduling
            n = len(workers)
            futures: list[Any] = [None] * len(prepared)
            for w, worker in enumerate(workers):
                idx = list(range(w, len(prepared), n))
                if idx:
                    done = self.client.compute([prepared[i] for i in idx], workers=[worker], allow_other_workers=True)
                    for i, f in zip(idx, done):
                        futures[i] = f
            return futures, True
        return [Lazy(f"{tag}-{self.fit_id}-{i}", d) for i, d in enumerate(prepared)], False

    def _fits_in_memory(self, npartitions: int) -> bool:
        info = self.client.scheduler_info()["workers"]
        total = sum(w.get("memory_limit", 0) or 0 for w in info.values())
        if not total:
            return True
        per_part = dask.utils.parse_bytes(str(config.get("io.blocksize", "64MiB")))
        return npartitions * per_part * 2 < 0.3 * total

    def _submit_sizes(self, sources: list[Any], cached: bool, workers: list[str]) -> list[Any]:
        if cached:
            return self.client.map(partition_sizes, sources, pure=False, priority=20)
        return [
            self.client.submit(partition_sizes, s, pure=False, workers=[workers[i % len(workers)]], allow_other_workers=True,
                               priority=20)
            for i, s in enumerate(sources)
        ]

    def _sizes(self, sources: list[Any], cached: bool, workers: list[str]) -> list[tuple[int, int, int]]:
        """(training rows, held-out rows, rows dropped for a missing target) per partition."""
        futs = self._size_futures or self._submit_sizes(sources, cached, workers)
        self._size_futures = None
        return [tuple(x) for x in self.gather(futs)]

    @staticmethod
    def _assign(sizes: list[int], n: int) -> list[list[int]]:
        """Partitions per stream (one stream per worker): partition ``p`` starts in stream
        ``p % n``, where ``_sources`` placed it, then moves to balance the rows. A function
        of the sizes alone, so that a fit is reproducible on the same number of workers."""
        streams: list[list[int]] = [list(range(w, len(sizes), n)) for w in range(n)]
        load = [sum(sizes[p] for p in s) for s in streams]
        for _ in range(len(sizes)):
            hi, lo = int(np.argmax(load)), int(np.argmin(load))
            moved = False
            for p in sorted(streams[hi], key=lambda p: sizes[p]):
                if 0 < sizes[p] and load[hi] - load[lo] >= 2 * sizes[p]:  # the move narrows the gap
                    streams[hi].remove(p)
                    streams[lo].append(p)
                    load[hi] -= sizes[p]
                    load[lo] += sizes[p]
                    moved = True
                    break
            if not moved:
                break
        return [sorted(s) for s in streams]

    def rounds_per_epoch(self) -> int:
        sync = self.strategy.steps_per_round()
        if sync is None:
            return 1
        rows = max(sum(self.train_sizes[p] for p in s) for s in self.streams)
        return max(1, math.ceil(rows / (sync * self.batch_size)))

    # ------------------------------------------------------------------ the cluster
    def live_workers(self) -> list[str]:
        """Ask the scheduler (an RPC): called at start and while waiting, not per task."""
        self._live = sorted(self.client.nthreads())
        lost = self._known - set(self._live)
        if lost - self.lost_workers:
            logger.warning("daskml_scale.fit: lost worker(s) %s; their tasks are rerun elsewhere", sorted(lost - self.lost_workers))
        self.lost_workers |= lost
        self._known |= set(self._live)
        return self._live

    def worker_for(self, stream: int) -> str | None:
        live = self._live or self.live_workers()
        if not live:
            return None
        home = self.homes[stream % len(self.homes)]
        if home in live:
            return home
        return live[stream % len(live)]

    def checkpoint_hint(self) -> str:
        """The end of an error message about a stopped fit."""
        if self.checkpoint:
            return f". The last checkpoint is at {self.checkpoint}; rerun with resume=True."
        return "."

    def gather(self, futures: list[Any]) -> list[Any]:
        """Gather, failing fast with names when every worker is gone (never hang)."""
        timeout = float(config.get("training.no-worker-timeout", 60))
        gone_since: float | None = None
        while not wait_done(futures, 0.5):
            if self.live_workers():
                gone_since = None
                continue
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > timeout:
                for f in futures:
                    f.cancel()
                raise WorkersLostError(
                    f"Every worker is gone ({sorted(self.lost_workers)} lost) and none came "
                    f"back within {timeout:.0f}s; training stopped" + self.checkpoint_hint(),
                    workers=sorted(self.lost_workers),
                )
        try:
            return self.client.gather(futures)
        except Exception as exc:
            from distributed import KilledWorker

            if isinstance(exc, KilledWorker):
                raise WorkersLostError(
                    f"A training task killed the workers that ran it ({exc}); training stopped" + self.checkpoint_hint(),
                    workers=sorted(self.lost_workers),
                ) from exc
            raise

    def ship_state(self, state: dict[str, Any]) -> Any:
        """Large states travel once to the cluster (a task), small ones inside the task."""
        nbytes = sum(np.asarray(a).nbytes for v in state.values() if v is not None for a in v)
        if nbytes > (1 << 20):
            return self.put(state, "state")
        return state

    def _ship(self, value: Any) -> Any:
        nbytes = sum(np.asarray(a).nbytes for a in value) if isinstance(value, list) else 0
        if nbytes > (1 << 20):
            return self.put(value, "weights")
        return value

    def put(self, value: Any, name: str) -> Any:
        """Put a value in the cluster once, as a task (not a scatter) so that the
        scheduler can recompute it if every worker that held it dies."""
        return self.client.submit(_identity, value, pure=False, key=f"daskml-{name}-{self.fit_id}-{uuid.uuid4().hex[:6]}")

    def note_worker_timings(self, results: list[dict[str, Any]]) -> None:
        """Keep the largest of each worker-side timing (model build, first trace) of the fit."""
        for r in results:
            for k, v in (r.get("timings") or {}).items():
                self._worker_timings[k] = max(self._worker_timings.get(k, 0.0), float(v))

    # ------------------------------------------------------------------ validation
    def _validation_rows(self) -> tuple[list[Any], list[list[int]], str]:
        if self.val_sources is not None:
            return self.val_sources, self.val_streams, "all"
        return self.sources, self.streams, "held-out"

    def inline_validation(self, workers: Sequence[str]) -> list[dict[str, Any] | None] | None:
        """See :meth:`EpochRunner.validation_for`."""
        if (self.val_sources is None and self.validation_fraction <= 0) or list(workers) != list(self.homes):
            return None
        sources, streams, rows = self._validation_rows()
        out: list[dict[str, Any] | None] = []
        for r in range(len(workers)):
            parts = streams[r] if r < len(streams) else []
            out.append({"parts": list(parts), "sources": {p: sources[p] for p in parts}, "rows": rows,
                        "batch_size": max(self.batch_size, 1024)} if parts else None)
        return out

    def start_validation(self, epoch: int) -> Callable[[], dict[str, float]]:
        """Start validating the epoch's final weights; the call returned waits for the logs."""
        answered = self.validated.pop(epoch, None)
        if answered is not None:  # the epoch's tasks validated at its final weights
            return lambda: self._validation_logs(answered)
        sources, streams, rows = self._validation_rows()
        weights = self._ship(self.weights)
        futs = []
        for s, parts in enumerate(streams):
            if not parts:
                continue
            addr = self.worker_for(s)
            futs.append(
                self.client.submit(
                    evaluate_parts, self.fit_id, self.model_bytes, weights, parts, {p: sources[p] for p in parts},
                    batch_size=max(self.batch_size, 1024), rows=rows, pure=False,
                    workers=[addr] if addr else None, allow_other_workers=True,
                    key=(f"daskml-validate-{self.fit_id}", epoch, uuid.uuid4().hex[:8], s),
                )
            )
        return lambda: self._validation_logs(self.gather(futs))

    def _validation_logs(self, answers: list[dict[str, Any]]) -> dict[str, float]:
        results = [r for r in answers if r.get("samples", 0) > 0]
        if not results:
            return {}
        logs = backend.metric_results(self.model, sum_states([r["metrics"] for r in results]))
        return {f"val_{k}": v for k, v in logs.items()}

    # ------------------------------------------------------------------ reporting
    def _progbar(self) -> bool:
        if self.verbose == "auto":
            return sys.stdout.isatty() or "ipykernel" in sys.modules
        return bool(self.verbose)

    def _check_restorable(self, ckpt: Checkpoint) -> None:
        if len(ckpt.weights) != len(self.weights) or any(
            np.shape(a) != np.shape(b) for a, b in zip(ckpt.weights, self.weights)
        ):
            raise TrainingError(
                f"The checkpoint at {self.checkpoint} holds weights of other shapes than this model's; "
                "it belongs to another model. Use another checkpoint URL or resume=False."
            )
        if ckpt.optimizer is not None and len(ckpt.optimizer) != len(self.optimizer_state):
            raise TrainingError(
                f"The checkpoint at {self.checkpoint} holds another optimizer's state "
                f"({len(ckpt.optimizer)} variables, this model's has {len(self.optimizer_state)})."
            )

    def describe(self) -> dict[str, Any]:
        return {
            **self.strategy.describe(), "epochs": self.epochs, "batch_size": self.batch_size,
            "workers": len(self.workers), "partitions": len(self.sources),
            "train_rows": int(sum(self.train_sizes)), "validation_rows": int(sum(self.val_sizes)),
            "cached": bool(self.cached), "seed": self.seed, "dropped_missing_target": int(self.dropped_missing_target),
        }

    def _warm_timings(self) -> None:
        done = [f for f in self._warm if f.status == "finished"]
        if done:
            self.note_worker_timings([{"timings": t} for t in self.client.gather(done)])

    def summary(self, history: Any) -> dict[str, Any]:
        self._warm_timings()
        last = {k: v[-1] for k, v in history.history.items() if v}
        return {**self.describe(), "epochs_run": len(history.history.get("loss", [])), "final": last,
                "lost_workers": sorted(self.lost_workers),
                "history": {k: [float(x) for x in v] for k, v in history.history.items()},  # plot_history(bundle)
                "timings": {**{k: round(v, 4) for k, v in self.timings.items()},
                            **{f"worker_{k}": round(v, 4) for k, v in self._worker_timings.items()}}}


def wait_done(futures: list[Any], timeout: float) -> bool:
    """``distributed.wait`` for at most ``timeout`` seconds: True when every future is done.

    Its TimeoutError is raised by ``sync()``, which also keeps it in a closure cell that its
    own frame refers to: a reference cycle through the traceback that would hold these
    futures (their results, a parameter server's actor) until the garbage collector runs.
    """
    from distributed import wait

    try:
        wait(futures, timeout=timeout)
        return True
    except TimeoutError as exc:
        exc.__traceback__ = None
        return False


def _identity(value: Any) -> Any:
    return value
