"""AllReduce: synchronous data parallelism with no driver and no server in the data path.

Every epoch, each worker runs one long task (:func:`allreduce_epoch`) that keeps its
model for the whole epoch. The workers form a ring of direct connections
(:mod:`daskml_scale.training.ring`) and reduce among themselves:

* ``every=1``: each worker computes the gradient of its batch, the ring sums the
  row-weighted gradients, and every worker applies the same mean with its own copy of
  the optimizer: exactly single-process SGD on the union of the workers' batches (one
  global batch of ``workers x batch_size`` rows per step). One graph call per step
  applies the last mean and computes the next gradient.
* ``every=k``: each worker takes ``k`` local steps with its own optimizer, then the
  ring averages the weights (local SGD, with no round trip to the driver).

Each reduce sends ``2 (N - 1) / N`` times the model's size per worker, whatever the
number of workers ``N``. The driver takes part at epoch boundaries only (validation,
callbacks, checkpoints). When a worker is lost, or a member stops answering, every wait
ends within ``timeout`` and the epoch restarts from the driver's copy of the state on
the workers that are left.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from daskml_scale import backend, config
from daskml_scale._utils.waits import run_bounded
from daskml_scale.exceptions import ArgumentError, TrainingError, WorkersLostError
from daskml_scale.training.averaging import weighted_average
from daskml_scale.training.ring import Ring, RingError, close_port, open_ports
from daskml_scale.training.strategy import Strategy
from daskml_scale.training.worker import StreamRange, evaluate_here, first_rows, gather_rows, model_for

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.training.runner import EpochRunner

__all__ = ["AllReduce", "allreduce_epoch"]

logger = logging.getLogger(__name__)

#: a worker gathers the rows of this many reduce steps at once (then slices them) ...
_STEPS_PER_BLOCK = 64
#: ... or more, up to this many bytes of rows, when they are one range of a shuffled stream
_BLOCK_BYTES = 32 << 20


class _RingState:
    """Per fit: the secret of its connections and the last epoch's statistics."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(32)
        self.rings: list[str] = []
        self.stats: dict[str, float] = {}
        self.restarts: tuple[int | None, int] = (None, 0)
        self.formed = False  # a ring worked once in this fit: later failures are losses
        self.fallback_state: Any = None
        self.fell_back = False


@dataclass
class AllReduce(Strategy):
    """Synchronous data parallelism: the workers reduce among themselves, directly.

    Parameters
    ----------
    every : int
        ``1``: gradients are all-reduced every step (single-process SGD on the global
        batch of ``workers x batch_size`` rows). ``k > 1``: weights are all-reduced
        (averaged) every ``k`` local steps.
    outer_lr : float
        ``every > 1``: scale of the averaged change of a round,
        ``w = w_sync + outer_lr * (mean(w_i) - w_sync)`` where ``w_sync`` are the weights
        of the last reduce (1.0: plain averaging). Above 1 it makes up for the progress
        that averaging gives up: each worker's steps were taken from the same start.
    timeout : float or None
        Seconds any wait of a worker may take (connecting, a neighbour's message);
        default ``daskml_scale.training.ps-timeout``.
    fallback : Strategy or None
        Used for the rest of the fit, with a warning, when the workers cannot form a
        ring at all (e.g. a firewall that lets only Dask's own ports through). ``None``:
        that is an error.

    Notes
    -----
    The History gets, per epoch, ``allreduce_steps`` (reduces per worker),
    ``allreduce_mb_sent`` (megabytes each worker sent) and ``allreduce_restarts``.
    Connections carry a per-fit secret in their handshake; on a ``tls://`` cluster they
    use TLS with the workers' certificates.

    Examples
    --------
    >>> daskml_scale.fit(model, ddf, preprocessor=pre, strategy=daskml_scale.AllReduce(every=1))
    """

    every: int = 1
    outer_lr: float = 1.0
    timeout: float | None = None
    fallback: Strategy | None = None

    name = "allreduce"

    def __post_init__(self) -> None:
        if not isinstance(self.every, (int, np.integer)) or self.every < 1:
            raise ArgumentError(f"Expected every to be a positive integer. Received: every={self.every!r}")
        if not isinstance(self.outer_lr, (int, float)) or not 0 < self.outer_lr <= 4:
            raise ArgumentError(f"Expected 0 < outer_lr <= 4. Received: outer_lr={self.outer_lr!r}")
        if self.every == 1 and self.outer_lr != 1.0:
            raise ArgumentError("outer_lr applies to every > 1 (with every=1 the optimizer's own step is taken); "
                                f"Received: every=1, outer_lr={self.outer_lr!r}")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.name, "every": int(self.every), "outer_lr": float(self.outer_lr)}
        if self.fallback is not None:
            out["fallback"] = self.fallback.describe()
        return out

    def release(self, state: _RingState) -> None:
        if self.fallback is not None and state.fallback_state is not None:
            self.fallback.release(state.fallback_state)

    def _run_fallback(self, runner: "EpochRunner", st: _RingState) -> None:
        assert self.fallback is not None
        runner.state = st.fallback_state
        try:
            self.fallback.run_epoch(runner)
        finally:
            runner.state = st

    def worker_functions(self) -> tuple[str, ...]:
        return ("fused",) if int(self.every) == 1 else ("local_sgd",)

    def create_state(self) -> _RingState:
        return _RingState()

    def _timeout(self) -> float:
        return float(self.timeout if self.timeout is not None else config.get("training.ps-timeout", 120))

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, runner: "EpochRunner") -> None:
        st: _RingState = runner.state
        if st.fell_back:
            return self._run_fallback(runner, st)
        every = int(self.every)
        blocks = runner.chunks(every * max(1, _STEPS_PER_BLOCK // every))
        restarts = int(config.get("training.ps-restarts", 3))
        causes: list[BaseException] = []
        for attempt in range(restarts + 1):
            workers = runner.live_workers()
            if not workers:
                raise WorkersLostError("Every worker is gone; AllReduce cannot go on" + runner.checkpoint_hint(),
                                       workers=sorted(runner.lost_workers))
            try:
                results = self._attempt(runner, st, blocks, workers, attempt)
            except (RingError, _MemberLost) as exc:
                causes.append(exc)
                if isinstance(exc, RingError) and not st.formed and self.fallback is not None:
                    logger.warning(
                        "daskml_scale.fit: the workers cannot connect to each other for AllReduce (%s); "
                        "this fit goes on with %s", exc, self.fallback.describe())
                    st.fell_back = True
                    st.fallback_state = self.fallback.create_state()
                    return self._run_fallback(runner, st)
                st.restarts = (runner.epoch, attempt + 1)
                logger.warning("daskml_scale.fit: AllReduce epoch %d attempt %d failed (%s); restarting the epoch "
                               "from the driver's copy on the live workers", runner.epoch, attempt, exc)
                continue
            break
        else:
            raise TrainingError(
                f"AllReduce failed {restarts + 1} times in epoch {runner.epoch}; training stopped" + runner.checkpoint_hint()
            ) from causes[-1]
        st.formed = True
        runner.note_timings(results)
        done = [r for r in results if r.get("samples", 0) > 0]
        if not done:
            return
        runner.weights = next(r["weights"] for r in results if r.get("weights") is not None)
        samples = [r["samples"] for r in done]
        runner.optimizer_state = weighted_average([r["optimizer"] for r in done], samples)
        runner.add_train_metrics([r["metrics"] for r in done], sum(samples))
        if any("validation" in r for r in results):
            runner.validated([r.get("validation") for r in results])
        st.stats = {"steps": float(max(r["steps"] for r in results)),
                    "mb_sent": float(max(r["bytes_sent"] for r in results)) / 1e6}
        runner.round_end()

    def _attempt(self, runner: "EpochRunner", st: _RingState, blocks: list[list[Any]], workers: list[str],
                 attempt: int) -> list[dict[str, Any]]:
        """One try at the epoch on ``workers``: each stream on its home worker, every input
        held where its task runs."""
        per_rank = runner.ranks(blocks, workers)
        rows_per_step = int(self.every) * runner.batch_size
        steps = [sum(-(-_rows(b) // rows_per_step) for b in bl) for bl in per_rank]
        ring_id = f"{runner.fit_id}-e{runner.epoch}-a{attempt}-{uuid.uuid4().hex[:4]}"
        st.rings.append(ring_id)
        client = runner.client
        futs: list[Any] = []
        state: list[Any] = []
        formed = False
        # the ranks end on the same weights, the driver's: each validates its rows there
        validation = runner.validation_for(workers) or [None] * len(workers)
        try:
            addresses = [(h, p) for _, h, p in self._open_ports(runner, ring_id, workers)]
            state = [runner.put_on({"weights": runner.weights, "optimizer": runner.optimizer_state}, workers,
                                   self._timeout(), "AllReduce")]
            futs = [
                client.submit(
                    allreduce_epoch, ring_id, r, addresses, st.secret, attempt, runner.fit_id, runner.model_bytes,
                    state[0], per_rank[r], max(steps), runner.sources(runner.parts_of(per_rank[r])),
                    batch_size=runner.batch_size, seed=runner.seed, epoch=runner.epoch, shuffle=runner.shuffle,
                    every=int(self.every), outer_lr=float(self.outer_lr), timeout=self._timeout(),
                    validation=validation[r], pure=False,
                    workers=[w], allow_other_workers=False,
                    key=(f"daskml-allreduce-{runner.fit_id}", runner.epoch, attempt, r),
                )
                for r, w in enumerate(workers)
            ]
            runner.round_begin()
            results = self._wait(runner, futs, workers)
            formed = True  # every rank's task formed its ring, which closed the rank's port
            return results
        finally:  # also when the ports or the weights did not arrive: no port is left open
            client.cancel(futs + state)
            if not formed:
                # bounded: a silent worker (alive to the scheduler, not answering) must not hold the fit
                run_bounded(client, close_port, ring_id, workers=[w for w in workers if w in runner.live_workers()],
                            what="AllReduce: closing the epoch's ports")

    def _open_ports(self, runner: "EpochRunner", ring_id: str, workers: list[str]) -> list[Any]:
        """Every rank's port (:func:`~daskml_scale.training.ring.open_ports`). A worker lost
        meanwhile, or one that cannot be reached or does not answer (it may be dying before
        the scheduler knows), ends the attempt as a lost member: the epoch restarts on the
        workers left, at most ``training.ps-restarts`` times."""
        try:
            return open_ports(runner.client, ring_id, workers, self._timeout())
        except Exception as exc:
            gone = ports_lost(runner, workers, exc)
            if gone is None:
                raise
            raise _MemberLost(f"worker(s) {gone or workers} did not open their ports: {exc}") from exc

    def _wait(self, runner: "EpochRunner", futs: list[Any], workers: list[str]) -> list[Any]:
        """Wait for one task per rank; a lost rank's worker ends the attempt at once."""
        while not runner.wait(futs, 0.5):
            live = set(runner.live_workers())
            gone = [w for w in workers if w not in live]
            if gone:
                raise _MemberLost(f"worker(s) {gone} left the ring")
        errors = [f for f in futs if f.status == "error"]
        if errors:
            exc = errors[0].exception()
            gone = [w for w in workers if w not in set(runner.live_workers())]
            if gone:
                raise _MemberLost(f"worker(s) {gone} left the ring") from exc
            if isinstance(exc, RingError):
                raise exc
        return runner.gather(futs)

    def epoch_logs(self, runner: "EpochRunner") -> dict[str, float]:
        st: _RingState = runner.state
        if st.fell_back:
            runner.state = st.fallback_state
            try:
                return {**self.fallback.epoch_logs(runner), "allreduce_fallback": 1.0}  # type: ignore[union-attr]
            finally:
                runner.state = st
        logs = {f"allreduce_{k}": v for k, v in st.stats.items()}
        epoch, restarts = st.restarts
        logs["allreduce_restarts"] = float(restarts if epoch == runner.epoch else 0)
        return logs


class _MemberLost(Exception):
    """A ring member's worker is gone (internal: the epoch restarts)."""


def ports_lost(runner: "EpochRunner", workers: list[str], exc: BaseException) -> list[str] | None:
    """Whether a failed :func:`~daskml_scale.training.ring.open_ports` lost members: the
    workers that left (an empty list when none left but one could not be reached or did
    not answer, as a dying worker does before the scheduler knows), or ``None`` when the
    failure is something else (it is raised as it is)."""
    live = set(runner.live_workers())
    gone = [w for w in workers if w not in live]
    return gone if gone or isinstance(exc, (OSError, TimeoutError)) else None


def _rows(chunk: Sequence[Any]) -> int:
    return sum(s.stop - s.start for s in chunk)


# ------------------------------------------------------------------------ the task
def allreduce_epoch(
    ring_id: str, rank: int, addresses: list[tuple[str, int]], secret: bytes, attempt: int,
    fit_id: str, model_bytes: bytes, state: dict[str, Any], blocks: Sequence[Sequence[Any]], n_steps: int,
    sources: dict[int, Any], *, batch_size: int, seed: int, epoch: int, shuffle: bool, every: int, timeout: float,
    outer_lr: float = 1.0, validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One rank's epoch: ``n_steps`` reduces (a rank whose rows ran out takes part with
    nothing, so every rank makes the same reduces). Returns samples, metric state,
    optimizer state, on rank 0 the weights, and with ``validation``
    (``EpochRunner.validation_for``) the metric state of those rows at the epoch's final
    weights, which every rank holds after the last reduce."""
    from distributed import secede

    try:
        secede()  # waits on the ring must not hold a slot of the worker's thread pool
    except (ValueError, KeyError):
        pass
    cached = model_for(fit_id, model_bytes)
    ring = Ring(ring_id, rank, addresses, secret, timeout, attempt)
    rows_per_step = every * batch_size
    t0 = time.perf_counter()
    try:
        with cached.lock:
            model = cached.model
            start_epoch(model, state, blocks, sources, seed, epoch, shuffle)
            samples = done = 0
            if every == 1:
                fused = cached.fused_fn
                size = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
                buf = np.empty(size + 1, dtype=np.float32)
                prev: np.ndarray | None = None
                for X, y in _steps(blocks, sources, seed, epoch, shuffle, rows_per_step, n_steps):
                    rows = len(X)
                    g = fused(X, y, prev) if rows else None
                    if g is None and prev is not None:
                        fused(None, None, prev)  # no batch left here: apply the mean, send nothing
                    buf[:-1] = 0.0 if g is None else g * np.float32(rows)
                    buf[-1] = rows
                    ring.allreduce(buf)
                    prev = buf[:-1] / np.float32(buf[-1]) if buf[-1] else None
                    samples += rows
                    done += 1
                if prev is not None:
                    fused(None, None, prev)
            else:
                local = _LocalState(cached, outer_lr)
                clock = time.perf_counter
                t_train = t_pack = t_reduce = 0.0
                pending: np.ndarray | None = None  # the last reduce's state, set by the next round's call
                for X, y in _steps(blocks, sources, seed, epoch, shuffle, rows_per_step, n_steps):
                    rows = len(X)
                    t1 = clock()
                    if rows:  # one call: set the reduced state, the local steps, read the state
                        state = cached.train_round(X, y, batch_size, pending)
                    elif pending is not None:  # nothing to train here: keep the model in step
                        local.assign(pending)
                    t2 = clock()
                    buf = local.weighed(state, rows) if rows else np.zeros(local.size, np.float32)
                    pending = None
                    t3 = clock()
                    ring.allreduce(buf)
                    t4 = clock()
                    if buf[-1]:
                        pending = local.outer_step(buf[:-1] / np.float32(buf[-1]))
                    t_train, t_pack, t_reduce = t_train + t2 - t1, t_pack + t3 - t2 + clock() - t4, t_reduce + t4 - t3
                    samples += rows
                    done += 1
                if pending is not None:
                    local.assign(pending)
                cached.timings.update(epoch_train_s=t_train, epoch_pack_s=t_pack, epoch_reduce_s=t_reduce)
            out = {
                "samples": samples, "steps": done, "bytes_sent": ring.bytes_sent,
                "metrics": backend.metric_state(model), "optimizer": backend.get_optimizer_state(model),
                "weights": backend.get_weights(model) if rank == 0 else None,
                "timings": {**cached.timings, "epoch_task_s": time.perf_counter() - t0},
            }
            if validation is not None:  # after the training metrics were read: it resets them
                out["validation"] = evaluate_here(cached, validation)
            return out
    finally:
        ring.close()


def start_epoch(model: Any, state: dict[str, Any], blocks: Sequence[Sequence[Any]], sources: dict[int, Any],
                seed: int, epoch: int, shuffle: bool) -> None:
    """An epoch task's start: build ``model`` on the first rows of ``blocks`` and set the
    driver's ``state`` on it (weights, optimizer slots), metrics reset."""
    sample = first_rows(blocks, sources)
    if sample is not None:
        backend.ensure_built(model, *sample)
    backend.set_weights(model, state["weights"])
    if state.get("optimizer"):
        backend.set_optimizer_state(model, state["optimizer"])
    backend.reset_metrics(model)


class _LocalState:
    """Local SGD's state as one float32 vector: the weights and the optimizer's float
    slots (Adam's moments), averaged together as ``ModelAveraging`` averages them; the
    outer step scales the change of the trainable weights since the last reduce. The
    vector's order is the worker model's ``local_sgd`` variables, then one element for
    the rows behind it (every element is weighed by the rows)."""

    def __init__(self, cached: Any, outer_lr: float) -> None:
        model = cached.model
        self.variables = cached.local_sgd[0]
        self.outer_lr = np.float32(outer_lr)
        self.n_weights = sum(int(np.prod(v.shape)) for v in model.weights)
        trainable = {id(v) for v in model.trainable_weights}
        self.mask = np.concatenate([np.full(int(np.prod(v.shape)), id(v) in trainable) for v in model.weights])
        self.size = sum(int(np.prod(v.shape)) for v in self.variables) + 1
        # the weights at the last reduce, as floats (an integer weight, e.g. a Normalization count, too)
        self.synced = (np.concatenate([np.ravel(np.asarray(w, dtype=np.float32)) for w in backend.get_weights(model)])
                       if self.outer_lr != 1 else None)

    def weighed(self, state: np.ndarray, rows: int) -> np.ndarray:
        """This member's contribution: ``state`` (the variables' values) and a 1, times ``rows``."""
        buf = np.empty(self.size, np.float32)
        np.multiply(state, np.float32(rows), out=buf[:-1])
        buf[-1] = rows
        return buf

    def outer_step(self, mean: np.ndarray) -> np.ndarray:
        """The state to continue from, given the members' mean (``mean`` is updated in place)."""
        if self.synced is not None:
            weights = mean[: self.n_weights]
            moved = self.synced + self.outer_lr * (weights - self.synced)
            mean[: self.n_weights] = np.where(self.mask, moved, weights)  # statistics: plain means
            self.synced = mean[: self.n_weights].copy()
        return mean

    def assign(self, state: np.ndarray) -> None:
        """Set the variables to ``state`` (outside a round's call: after the last reduce)."""
        backend.assign_values(self.variables, backend.unpack(state, [tuple(v.shape) for v in self.variables]))


def _steps(blocks: Sequence[Sequence[Any]], sources: dict[int, Any], seed: int, epoch: int, shuffle: bool,
           rows_per_step: int, n_steps: int):
    """``n_steps`` (X, y) pairs: the blocks' rows cut into steps, then empty steps."""
    given = 0
    empty: tuple[np.ndarray, np.ndarray] | None = None
    for block in _coalesced(blocks, sources):
        X, y = gather_rows(block, sources, seed, epoch, shuffle)
        empty = (X[:0], y[:0])
        for a in range(0, len(X), rows_per_step):
            yield X[a: a + rows_per_step], y[a: a + rows_per_step]
            given += 1
    if given < n_steps and empty is None:
        empty = (np.zeros((0, 1), np.float32), np.zeros((0,), np.float32))
    for _ in range(n_steps - given):
        yield empty


def _coalesced(blocks: Sequence[Sequence[Any]], sources: dict[int, Any]) -> list[list[Any]]:
    """Consecutive blocks that are adjacent ranges of one shuffled stream, joined into
    ranges of at most ``_BLOCK_BYTES`` of rows: one gather (a pass of fancy indexing)
    for many steps instead of one per block. Blocks hold whole steps (all but a stream's
    last), so the steps cut from a joined range are the same rows."""
    out: list[list[Any]] = []
    row_bytes: int | None = None
    for block in blocks:
        if out and len(block) == 1 and len(out[-1]) == 1:
            last, r = out[-1][0], block[0]
            if isinstance(last, StreamRange) and isinstance(r, StreamRange) and last.parts == r.parts \
                    and last.stream == r.stream and last.stop == r.start:
                if row_bytes is None:
                    row_bytes = _row_bytes(sources[r.parts[0]])
                if (r.stop - last.start) * row_bytes <= _BLOCK_BYTES:
                    out[-1] = [StreamRange(last.parts, last.start, r.stop, last.stream)]
                    continue
        out.append(list(block))
    return out


def _row_bytes(source: Any) -> int:
    if not isinstance(source, dict):  # a lazy partition: not read here just to measure it
        return _BLOCK_BYTES + 1
    X, y = source["X"], source["y"]
    return int(X.itemsize * np.prod(X.shape[1:], dtype=np.int64) + y.itemsize * np.prod(y.shape[1:], dtype=np.int64))
