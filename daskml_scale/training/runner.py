"""What a strategy sees of one epoch: :class:`EpochRunner`.

Every strategy (model averaging, the parameter server, all-reduce, one of the user's
own) works through this public API only: the epoch's rows per stream, the master
state, tasks pinned to a stream's worker, waits that never hang, and the hooks that
report progress to Keras callbacks. See :mod:`daskml_scale.training.strategy`.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from daskml_scale import backend
from daskml_scale.training.worker import PartSlice, StreamRange, train_round

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.training.driver import Fit

__all__ = ["EpochRunner", "sum_states"]

Slices = list[PartSlice | StreamRange]


def sum_states(states: Sequence[list[list[np.ndarray]]]) -> list[list[np.ndarray]]:
    """Element-wise sum of metric states (lists of lists of arrays), in float64."""
    total = [[np.array(v, dtype=np.float64) for v in m] for m in states[0]]
    for s in states[1:]:
        for tm, sm in zip(total, s):
            for i, v in enumerate(sm):
                tm[i] = tm[i] + np.asarray(v, dtype=np.float64)
    return total


class EpochRunner:
    """One epoch of one fit, as a strategy drives it.

    Attributes
    ----------
    epoch : int
        0-based epoch number.
    state : object
        The strategy's own per-fit state (what ``Strategy.create_state()`` returned).
    """

    def __init__(self, fit: "Fit", epoch: int) -> None:
        self._fit = fit
        self.epoch = epoch
        self.state = fit.strategy_state
        self._metric_sum: list[list[np.ndarray]] | None = None
        self._samples = 0
        self._round = 0

    # ------------------------------------------------------------ the fit's settings
    @property
    def client(self) -> Any:
        return self._fit.client

    @property
    def fit_id(self) -> str:
        """Unique per fit: keys the workers' model cache and the tasks' names."""
        return self._fit.fit_id

    @property
    def model(self) -> Any:
        """The driver's model (its weights are set from :attr:`weights` after the epoch)."""
        return self._fit.model

    @property
    def model_bytes(self) -> Any:
        """The model's ``.keras`` bytes, as a future in the cluster: pass it to tasks."""
        return self._fit.model_bytes

    @property
    def batch_size(self) -> int:
        return self._fit.batch_size

    @property
    def seed(self) -> int:
        return self._fit.seed

    @property
    def shuffle(self) -> bool:
        return self._fit.shuffle

    @property
    def n_streams(self) -> int:
        """Streams of rows, one per worker at the start of the fit."""
        return len(self._fit.streams)

    @property
    def lost_workers(self) -> set[str]:
        return set(self._fit.lost_workers)

    def checkpoint_hint(self) -> str:
        """The end of an error message: where the last checkpoint is, and how to resume."""
        return self._fit.checkpoint_hint()

    # ------------------------------------------------------------ the master state
    @property
    def weights(self) -> list[np.ndarray]:
        return self._fit.weights

    @weights.setter
    def weights(self, value: list[np.ndarray]) -> None:
        self._fit.weights = value

    @property
    def optimizer_state(self) -> list[np.ndarray]:
        return self._fit.optimizer_state

    @optimizer_state.setter
    def optimizer_state(self, value: list[np.ndarray]) -> None:
        self._fit.optimizer_state = value

    @property
    def initial_optimizer_state(self) -> list[np.ndarray]:
        """The optimizer's fresh slots (before any step)."""
        return self._fit.initial_optimizer_state

    @property
    def trainable_mask(self) -> list[bool]:
        """Per entry of :attr:`weights`: whether it is trainable."""
        return self._fit.trainable_mask

    # ------------------------------------------------------------ the cluster
    def live_workers(self) -> list[str]:
        """The workers now (an RPC to the scheduler); notes the ones lost since the start."""
        return self._fit.live_workers()

    def worker_for(self, stream: int) -> str | None:
        """The worker a stream's tasks run on: its home, or a live one after a loss."""
        return self._fit.worker_for(stream)

    def sources(self, parts: Sequence[int]) -> dict[int, Any]:
        """The prepared partitions ``parts`` (futures or lazy graphs), to pass to a task."""
        return {p: self._fit.sources[p] for p in parts}

    def parts_of(self, slices: Sequence[Any]) -> list[int]:
        """The partitions that ``slices`` (or chunks of slices) read."""
        out: set[int] = set()
        for s in slices:
            if isinstance(s, (PartSlice, StreamRange)):
                out.update(s.parts)
            else:
                out.update(self.parts_of(s))
        return sorted(out)

    def submit(self, fn: Callable[..., Any], *args: Any, stream: int | None, name: str, **kwargs: Any) -> Any:
        """``client.submit`` on the stream's worker (another one may take it after a loss),
        never cached (``pure=False``), keyed ``(name-fit_id, epoch, uuid, stream)``."""
        addr = self.worker_for(stream) if stream is not None else None
        return self.client.submit(
            fn, *args, pure=False, workers=[addr] if addr else None, allow_other_workers=True,
            key=(f"{name}-{self.fit_id}", self.epoch, uuid.uuid4().hex[:8], -1 if stream is None else stream),
            **kwargs,
        )

    def gather(self, futures: list[Any]) -> list[Any]:
        """Results of ``futures``; fails fast with the lost workers' names when every
        worker is gone (never hangs)."""
        return self._fit.gather(futures)

    def wait(self, futures: list[Any], timeout: float) -> bool:
        """Wait at most ``timeout`` seconds: True when every future is done."""
        from daskml_scale.training.driver import wait_done

        return wait_done(futures, timeout)

    def note_timings(self, results: list[dict[str, Any]]) -> None:
        """Keep the worker-side timings (``result["timings"]``) of tasks in the fit's summary."""
        self._fit.note_worker_timings(results)

    def put(self, value: Any, name: str) -> Any:
        """``value`` in the cluster once, as a task (recomputed if its holders die)."""
        return self._fit.put(value, name)

    def put_on(self, value: Any, workers: Sequence[str], timeout: float, who: str) -> Any:
        """``value`` held by each of ``workers`` (one key, a replica on each), for tasks
        pinned to those workers: none of them then fetches an input from another
        worker, which a silent worker (alive to the scheduler, not answering) would hold.
        Not done within ``timeout`` seconds: a :class:`WorkersLostError`."""
        from daskml_scale.exceptions import WorkersLostError

        try:
            # a list of one: a dict would be scattered value by value, under its own keys as Dask keys
            [future] = self.client.scatter([value], workers=list(workers), broadcast=True, hash=False,
                                           timeout=timeout)
            return future
        except (TimeoutError, OSError) as exc:
            raise WorkersLostError(f"{who}: the epoch's weights did not reach the workers {sorted(workers)} within "
                                   f"{timeout:.0f}s ({type(exc).__name__}: {exc})" + self.checkpoint_hint(),
                                   workers=sorted(workers)) from exc

    def ranks(self, blocks: Sequence[list[Any]], workers: Sequence[str]) -> list[list[Any]]:
        """Per rank ``r`` (the task on ``workers[r]``), the blocks of the streams it trains:
        a stream goes to its home worker while that one is among ``workers`` (its
        prepared partitions are there), otherwise round-robin."""
        index = {w: r for r, w in enumerate(workers)}
        homes = self._fit.homes
        per_rank: list[list[Any]] = [[] for _ in workers]
        for s, b in enumerate(blocks):
            home = homes[s % len(homes)] if homes else None
            per_rank[index.get(home, s % len(workers))].extend(b)  # type: ignore[arg-type]
        return per_rank

    # ------------------------------------------------------------ validation in the epoch's tasks
    def validation_for(self, workers: Sequence[str]) -> list[dict[str, Any] | None] | None:
        """Per rank (the task on ``workers[r]``), the validation rows that task can evaluate
        itself once it holds the epoch's final weights, with
        :func:`~daskml_scale.training.worker.evaluate_here`; ``None`` for a rank with no
        validation rows. ``None`` when the fit does not validate, or when ``workers`` are
        not the fit's first workers in their order (the validation partitions are placed
        by those). A strategy whose epoch tasks end on the weights the driver keeps (all
        ranks alike) saves the driver a round of validation tasks; it hands the tasks'
        answers to :meth:`validated`."""
        return self._fit.inline_validation(workers)

    def validated(self, answers: Sequence[dict[str, Any] | None]) -> None:
        """The epoch's validation, computed by its tasks (their :meth:`validation_for` rows)."""
        self._fit.validated[self.epoch] = [a for a in answers if a is not None]

    # ------------------------------------------------------------ the epoch's rows
    def stream_order(self, stream: int) -> list[int]:
        """The stream's partitions in this epoch's (seeded) order."""
        fit = self._fit
        parts = list(fit.streams[stream])
        if fit.shuffle:
            rng = np.random.default_rng([fit.seed, self.epoch, 104729, stream])
            parts = [parts[i] for i in rng.permutation(len(parts))]
        return parts

    def rounds(self, steps_per_round: int | None) -> Iterator[list[Slices]]:
        """Per round, per stream, the rows to train on (an empty list: the stream is done).

        Cached data is shuffled across all of a worker's partitions (:class:`StreamRange`);
        streamed data partition by partition, in a shuffled partition order (a worker
        then holds one partition at a time).
        """
        per_stream = [self._stream_chunks(s, steps_per_round) for s in range(self.n_streams)]
        n_rounds = max((len(c) for c in per_stream), default=0)
        for r in range(n_rounds):
            yield [c[r] if r < len(c) else [] for c in per_stream]

    def chunks(self, steps_per_chunk: int | None) -> list[list[Slices]]:
        """Per stream, its epoch cut into chunks of ``steps_per_chunk`` batches (the
        same cuts as :meth:`rounds`), for strategies whose workers run a whole epoch
        in one task."""
        return [self._stream_chunks(s, steps_per_chunk) for s in range(self.n_streams)]

    def _stream_chunks(self, s: int, steps: int | None) -> list[Slices]:
        fit = self._fit
        room = None if steps is None else steps * fit.batch_size
        if fit.cached and fit.shuffle:
            parts = tuple(fit.streams[s])
            total = sum(fit.train_sizes[p] for p in parts)
            step = total if room is None else room
            return [[StreamRange(parts, a, min(a + step, total), s)] for a in range(0, total, step)] if total else []
        chunks: list[Slices] = []
        current: Slices = []
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
        return chunks

    # ------------------------------------------------------------ model averaging's round
    def run_round(self, state: dict[str, Any], round_slices: list[Slices]) -> list[dict[str, Any]]:
        """Train every stream's slices from ``state`` (``weights``, ``optimizer``), one
        task per stream on its worker; returns each task's weights, optimizer state,
        metric state and samples."""
        fit = self._fit
        state = fit.ship_state(state)
        futs = [
            self.submit(
                train_round, fit.fit_id, fit.model_bytes, state, slices, self.sources(self.parts_of(slices)),
                batch_size=fit.batch_size, seed=fit.seed, epoch=self.epoch, shuffle=fit.shuffle,
                stream=s, name="daskml-train",
            )
            for s, slices in enumerate(round_slices) if slices
        ]
        self.round_begin()
        results = self.gather(futs)
        self.note_timings(results)
        return results

    # ------------------------------------------------------------ reporting
    def round_begin(self) -> None:
        """Tell the callbacks a round (a Keras "batch") starts."""
        self._fit.callbacks.on_train_batch_begin(self._round)

    def add_train_metrics(self, states: list[list[list[np.ndarray]]], samples: int) -> None:
        """Add the workers' metric states (sums) of a round to the epoch's."""
        if not states:
            return
        summed = sum_states(states)
        self._metric_sum = summed if self._metric_sum is None else sum_states([self._metric_sum, summed])
        self._samples += samples

    def round_end(self) -> bool:
        """Report the round to the callbacks (as a Keras batch); True when they ask to stop."""
        logs = {}
        if self._metric_sum:
            # the first metric is Keras's loss tracker, a Mean: (total, count)
            total, count = (float(np.asarray(v)) for v in self._metric_sum[0][:2])
            logs["loss"] = total / count if count else float("nan")
        self._fit.callbacks.on_train_batch_end(self._round, logs)
        self._round += 1
        return bool(self._fit.model.stop_training)

    def train_logs(self) -> dict[str, float]:
        """The epoch's training metrics from what :meth:`add_train_metrics` summed."""
        if self._metric_sum is None:
            return {}
        return backend.metric_results(self._fit.model, self._metric_sum)
