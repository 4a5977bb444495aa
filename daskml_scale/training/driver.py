"""The driver side of ``fit``: planning, rounds, validation, callbacks, checkpoints.

The driver holds the master state (weights, optimizer slots, history). Workers get
pure tasks of (state, partition slices); when a worker dies Dask reruns its task on
another worker, and partitions it held are recomputed from their source.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any, Iterator, Sequence

import dask
import numpy as np

from daskml_scale import config
from daskml_scale.exceptions import DataError, TrainingError, WorkersLostError
from daskml_scale.training import backend
from daskml_scale.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from daskml_scale.training.worker import Lazy, PartSlice, StreamRange, evaluate_parts, partition_sizes, prepare_partition, train_round

logger = logging.getLogger(__name__)

__all__ = ["Fit", "EpochRunner"]


def _sum_states(states: Sequence[list[list[np.ndarray]]]) -> list[list[np.ndarray]]:
    total = [[np.array(v, dtype=np.float64) for v in m] for m in states[0]]
    for s in states[1:]:
        for tm, sm in zip(total, s):
            for i, v in enumerate(sm):
                tm[i] = tm[i] + np.asarray(v, dtype=np.float64)
    return total


class Fit:
    """One call of :func:`daskml_scale.fit`, from planning to the last epoch."""

    def __init__(
        self, *, client: Any, model: Any, data: Any, preprocessor: Any, strategy: Any, epochs: int,
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
        self.scratch: dict[str, Any] = {}
        self.lost_workers: set[str] = set()

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

    def _sizes(self, sources: list[Any], cached: bool, workers: list[str]) -> list[tuple[int, int]]:
        if cached:
            futs = self.client.map(partition_sizes, sources, pure=False)
        else:
            futs = [
                self.client.submit(partition_sizes, s, pure=False, workers=[workers[i % len(workers)]], allow_other_workers=True)
                for i, s in enumerate(sources)
            ]
        return [tuple(x) for x in self._gather(futs)]

    @staticmethod
    def _assign(sizes: list[int], n: int) -> list[list[int]]:
        """Partitions per stream (one stream per worker): partition ``p`` starts in stream
        ``p % n``, where ``_sources`` placed it, then moves to balance the rows. A function
        of the sizes alone, so that a fit is reproducible on the same number of workers."""
        streams: list[list[int]] = [list(range(w, len(sizes), n)) for w in range(n)]
        # balance: move partitions from the heaviest to the lightest stream while it helps
        load = [sum(sizes[p] for p in s) for s in streams]
        for _ in range(len(sizes)):
            hi, lo = int(np.argmax(load)), int(np.argmin(load))
            movable = sorted(streams[hi], key=lambda p: sizes[p])
            moved = False
            for p in movable:
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

    def live_workers(self) -> list[str]:
        """Ask the scheduler (an RPC): called at start and while waiting, not per task."""
        self._live = sorted(self.client.nthreads())
        known = getattr(self, "_known", set())
        lost = known - set(self._live)
        if lost - self.lost_workers:
            logger.warning("daskml_scale.fit: lost worker(s) %s; their tasks are rerun elsewhere", sorted(lost - self.lost_workers))
        self.lost_workers |= lost
        self._known = known | set(self._live)
        return self._live

    def worker_for(self, stream: int) -> str | None:
        live = getattr(self, "_live", None) or self.live_workers()
        if not live:
            return None
        home = self.homes[stream]
        if home in live:
            return home
        return live[stream % len(live)]

    # ------------------------------------------------------------------ waiting
    def _gather(self, futures: list[Any]) -> list[Any]:
        """Gather, failing fast with names when every worker is gone (never hang)."""
        timeout = float(config.get("training.no-worker-timeout", 60))
        gone_since: float | None = None
        while True:
            if wait_done(futures, 0.5):
                break
            live = set(self.live_workers())
            if live:
                gone_since = None
                continue
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > timeout:
                for f in futures:
                    f.cancel()
                raise WorkersLostError(
                    f"Every worker is gone ({sorted(self.lost_workers)} lost) and none came "
                    f"back within {timeout:.0f}s; training stopped"
                    + (f". The last checkpoint is at {self.checkpoint}; rerun with resume=True." if self.checkpoint else "."),
                    workers=sorted(self.lost_workers),
                )
        try:
            return self.client.gather(futures)
        except Exception as exc:
            from distributed import KilledWorker

            if isinstance(exc, KilledWorker):
                raise WorkersLostError(
                    f"A training task killed the workers that ran it ({exc}); training stopped"
                    + (f". The last checkpoint is at {self.checkpoint}." if self.checkpoint else "."),
                    workers=sorted(self.lost_workers),
                ) from exc
            raise

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        """Train; whatever happens, release what the fit put in the cluster."""
        try:
            return self._run()
        finally:
            self._release()

    def _run(self) -> Any:
        import keras

        client = self.client
        workers = self.live_workers()
        if not workers:
            raise WorkersLostError("The cluster has no workers: start some, or call daskml_scale.connect()")
        self.workers = workers
        # sources: training (with a held-out split) and validation
        self.sources, self.cached = self._sources(self.data, self.validation_fraction, "train", workers)
        sizes = self._sizes(self.sources, self.cached, workers)
        self.train_sizes = [s[0] for s in sizes]
        self.val_sizes = [s[1] for s in sizes]
        if sum(self.train_sizes) == 0:
            raise DataError("Expected training rows. Received: 0 rows after reading and preprocessing the data")
        self.streams = self._assign(self.train_sizes, len(workers))
        self.homes = list(workers)
        self.val_sources = None
        if self.validation_data is not None:
            self.val_sources, _ = self._sources(self.validation_data, 0.0, "val", workers)
            self.val_streams = [list(range(i, len(self.val_sources), len(workers))) for i in range(len(workers))]
        elif self.validation_fraction > 0:
            self.val_streams = self.streams

        # the model: bytes to the workers once, master state on the driver
        sample = self._gather([client.submit(_sample_rows, self.sources[int(np.argmax(self.train_sizes))], pure=False)])[0]
        backend.ensure_built(self.model, sample[0], sample[1])
        self.model_bytes = self._put(backend.model_to_bytes(self.model), "model")
        self.weights = backend.get_weights(self.model)
        trainable = {id(v) for v in self.model.trainable_weights}
        self.trainable_mask = [id(v) in trainable for v in self.model.weights]
        self.optimizer_state = backend.get_optimizer_state(self.model)
        self.initial_optimizer_state = self.optimizer_state

        start_epoch = 0
        restored: Checkpoint | None = None
        if self.checkpoint and self.resume:
            restored = load_checkpoint(self.checkpoint, self.storage_options)
            if restored is not None:
                self._check_restorable(restored)
                self.weights = restored.weights
                if restored.optimizer is not None:
                    self.optimizer_state = restored.optimizer
                start_epoch = restored.epoch + 1
        rounds_per_epoch = self.rounds_per_epoch()
        cb = keras.callbacks.CallbackList(
            self.user_callbacks, add_history=True, add_progbar=self._progbar(), model=self.model,
            verbose=1 if self._progbar() else 0, epochs=self.epochs, steps=rounds_per_epoch,
        )
        self.callbacks = cb
        self.model.stop_training = False
        cb.on_train_begin()
        history = self.model.history
        if restored is not None:
            history.history = {k: list(v) for k, v in restored.history.items()}
            history.epoch = list(range(start_epoch))
        logs: dict[str, float] = {}
        for epoch in range(start_epoch, self.epochs):
            cb.on_epoch_begin(epoch)
            runner = EpochRunner(self, epoch)
            self.strategy.run_epoch(runner)
            logs = runner.train_logs()
            logs.update(self.strategy_logs(runner))
            backend.set_weights(self.model, self.weights)
            self.live_workers()  # notes workers lost during the epoch
            if self.val_sources is not None or self.validation_fraction > 0:
                logs.update(self.validate())
            cb.on_epoch_end(epoch, logs)
            if self.checkpoint:
                save_checkpoint(
                    self.checkpoint,
                    Checkpoint(epoch, self.weights, self.optimizer_state, dict(history.history),
                               info={"fit": self.describe()}),
                    self.storage_options,
                )
            if self.model.stop_training:
                break
        if self.optimizer_state:  # the driver's model leaves with the trained optimizer too
            backend.set_optimizer_state(self.model, self.optimizer_state)
        cb.on_train_end(logs)
        history.daskml_summary = self.summary(history)
        return history

    def _release(self) -> None:
        release = getattr(getattr(self, "strategy", None), "release", None)
        if release is not None:
            release(self.scratch)
        futures = [s for s in getattr(self, "sources", []) if not isinstance(s, Lazy)]
        if getattr(self, "val_sources", None):
            futures += [s for s in self.val_sources if not isinstance(s, Lazy)]
        # and what a strategy kept for the fit (e.g. the parameter server's actor future)
        futures += [v for v in self.scratch.values() if hasattr(v, "release") and hasattr(v, "key")]
        for f in futures + [getattr(self, "model_bytes", None)]:
            try:
                if f is not None:
                    f.release()
            except Exception:
                pass
        self.scratch.clear()

    def _progbar(self) -> bool:
        if self.verbose == "auto":
            import sys

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

    def rounds_per_epoch(self) -> int:
        sync = getattr(self.strategy, "steps_per_round", lambda: getattr(self.strategy, "sync_every", None))()
        if sync is None:
            return 1
        rows = max(sum(self.train_sizes[p] for p in s) for s in self.streams)
        return max(1, math.ceil(rows / (sync * self.batch_size)))

    def strategy_logs(self, runner: "EpochRunner") -> dict[str, float]:
        hook = getattr(self.strategy, "epoch_logs", None)
        return hook(runner) if hook else {}

    def describe(self) -> dict[str, Any]:
        return {
            **self.strategy.describe(), "epochs": self.epochs, "batch_size": self.batch_size,
            "workers": len(self.workers), "partitions": len(self.sources),
            "train_rows": int(sum(self.train_sizes)), "validation_rows": int(sum(self.val_sizes)),
            "cached": bool(self.cached), "seed": self.seed,
        }

    def summary(self, history: Any) -> dict[str, Any]:
        last = {k: v[-1] for k, v in history.history.items() if v}
        return {**self.describe(), "epochs_run": len(history.history.get("loss", [])), "final": last,
                "lost_workers": sorted(self.lost_workers)}

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        if self.val_sources is not None:
            sources, streams, which = self.val_sources, self.val_streams, "train"
        else:
            sources, streams, which = self.sources, self.streams, "val"
        weights = self._ship(self.weights)
        futs = []
        for s, parts in enumerate(streams):
            if not parts:
                continue
            addr = self.worker_for(s % len(self.homes))
            futs.append(
                self.client.submit(
                    evaluate_parts, self.fit_id, self.model_bytes, weights, parts, {p: sources[p] for p in parts},
                    batch_size=max(self.batch_size, 1024), which=which, pure=False,
                    workers=[addr] if addr else None, allow_other_workers=True,
                    key=(f"daskml-validate-{self.fit_id}", uuid.uuid4().hex[:8], s),
                )
            )
        results = [r for r in self._gather(futs) if r.get("samples", 0) > 0]
        if not results:
            return {}
        logs = backend.metric_results(self.model, _sum_states([r["metrics"] for r in results]))
        return {f"val_{k}": v for k, v in logs.items()}

    def _ship_state(self, state: dict[str, Any]) -> Any:
        """Large states travel once to the cluster (scatter), small ones inside the task."""
        nbytes = sum(np.asarray(a).nbytes for v in state.values() if v is not None for a in v)
        if nbytes > (1 << 20):
            return self._put(state, "state")
        return state

    def _ship(self, value: Any) -> Any:
        nbytes = sum(np.asarray(a).nbytes for a in value) if isinstance(value, list) else 0
        if nbytes > (1 << 20):
            return self._put(value, "weights")
        return value

    def _put(self, value: Any, name: str) -> Any:
        """Put a value in the cluster once, as a task (not a scatter) so that the
        scheduler can recompute it if every worker that held it dies."""
        return self.client.submit(_identity, value, pure=False, key=f"daskml-{name}-{self.fit_id}-{uuid.uuid4().hex[:6]}")


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


def _sample_rows(arrays: Any) -> tuple[np.ndarray, np.ndarray]:
    from daskml_scale.training.worker import _materialize

    a = _materialize(arrays)
    return a["X"][:2], a["y"][:2]


class EpochRunner:
    """What a strategy sees of one epoch: the rounds to run and the shared state."""

    def __init__(self, fit: Fit, epoch: int) -> None:
        self.fit = fit
        self.epoch = epoch
        self._metric_sum: list[list[np.ndarray]] | None = None
        self._samples = 0
        self._round = 0
        self.scratch = fit.scratch

    @property
    def weights(self) -> list[np.ndarray]:
        return self.fit.weights

    @weights.setter
    def weights(self, value: list[np.ndarray]) -> None:
        self.fit.weights = value

    @property
    def optimizer_state(self) -> list[np.ndarray]:
        return self.fit.optimizer_state

    @optimizer_state.setter
    def optimizer_state(self, value: list[np.ndarray]) -> None:
        self.fit.optimizer_state = value

    @property
    def trainable_mask(self) -> list[bool]:
        return self.fit.trainable_mask

    def stream_order(self, stream: int) -> list[int]:
        parts = list(self.fit.streams[stream])
        if self.fit.shuffle:
            rng = np.random.default_rng([self.fit.seed, self.epoch, 104729, stream])
            parts = [parts[i] for i in rng.permutation(len(parts))]
        return parts

    def rounds(self, steps_per_round: int | None) -> Iterator[list[list[PartSlice | StreamRange]]]:
        """Per round, per stream, the rows to train on (an empty list: the stream is done).

        Cached data is shuffled across all of a worker's partitions (:class:`StreamRange`);
        streamed data partition by partition, in a shuffled partition order (a worker
        then holds one partition at a time).
        """
        fit = self.fit
        room = None if steps_per_round is None else steps_per_round * fit.batch_size
        per_stream: list[list[list[PartSlice | StreamRange]]] = []
        for s in range(len(fit.streams)):
            if fit.cached and fit.shuffle:
                parts = tuple(fit.streams[s])
                total = sum(fit.train_sizes[p] for p in parts)
                step = total if room is None else room
                per_stream.append(
                    [[StreamRange(parts, a, min(a + step, total), s)] for a in range(0, total, step)] if total else []
                )
                continue
            chunks: list[list[PartSlice | StreamRange]] = []
            current: list[PartSlice | StreamRange] = []
            filled = 0
            for p in self.stream_order(s):
                n = fit.train_sizes[p]
                start = 0
                while start < n:
                    take = n - start if room is None else min(n - start, room - filled)
                    current.append(PartSlice(p, start, start + take))
                    start += take
                    filled += take
                    if room is not None and filled >= room:
                        chunks.append(current)
                        current, filled = [], 0
            if current:
                chunks.append(current)
            per_stream.append(chunks)
        n_rounds = max((len(c) for c in per_stream), default=0)
        for r in range(n_rounds):
            yield [c[r] if r < len(c) else [] for c in per_stream]

    @property
    def initial_optimizer_state(self) -> list[np.ndarray]:
        return self.fit.initial_optimizer_state

    def run_round(self, state: dict[str, Any], round_slices: list[list[PartSlice]]) -> list[dict[str, Any]]:
        fit = self.fit
        state = fit._ship_state(state)
        futs = []
        for s, slices in enumerate(round_slices):
            if not slices:
                continue
            addr = fit.worker_for(s)
            parts = sorted({p for sl in slices for p in sl.parts})
            futs.append(
                fit.client.submit(
                    train_round, fit.fit_id, fit.model_bytes, state, slices, {p: fit.sources[p] for p in parts},
                    batch_size=fit.batch_size, seed=fit.seed, epoch=self.epoch, shuffle=fit.shuffle,
                    pure=False, workers=[addr] if addr else None,
                    # tuple keys: the dashboard groups every round of the fit as "daskml-train"
                    allow_other_workers=True, key=(f"daskml-train-{fit.fit_id}", self.epoch, self._round, s),
                )
            )
        self.fit.callbacks.on_train_batch_begin(self._round)
        return fit._gather(futs)

    def add_train_metrics(self, states: list[list[list[np.ndarray]]], samples: int) -> None:
        summed = _sum_states(states)
        self._metric_sum = summed if self._metric_sum is None else _sum_states([self._metric_sum, summed])
        self._samples += samples

    def round_end(self) -> bool:
        """Report the round to the callbacks (as a Keras batch); True when they ask to stop."""
        logs = {}
        if self._metric_sum:
            # the first metric is Keras's loss tracker, a Mean: (total, count)
            total, count = (float(np.asarray(v)) for v in self._metric_sum[0][:2])
            logs["loss"] = total / count if count else float("nan")
        self.fit.callbacks.on_train_batch_end(self._round, logs)
        self._round += 1
        return bool(self.fit.model.stop_training)

    def train_logs(self) -> dict[str, float]:
        if self._metric_sum is None:
            return {}
        return backend.metric_results(self.fit.model, self._metric_sum)
