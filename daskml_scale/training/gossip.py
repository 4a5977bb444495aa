"""Gossip: decentralized averaging among neighbours, with no barrier and no central copy.

Every epoch, each worker runs one long task (:func:`gossip_epoch`) over its rows. Every
``every`` local steps it sends its state (the weights and the optimizer's float slots)
to ``peers`` neighbours and averages its own with what its neighbours sent it. The
neighbours are a ring (rank ``r`` sends to ``r + 1 .. r + peers`` and hears from
``r - 1 .. r - peers``) or, with ``topology="random"``, ``peers`` shifts drawn per round
from a generator seeded by ``(seed, epoch, round)``: every member draws the same shifts,
so each knows whom to expect without asking anyone.

Nothing waits for everyone. Messages go out on a thread of their own and land in a
mailbox (the newest per sender); a worker waits for an expected neighbour's message at
most ``wait`` seconds, then skips that exchange and counts it. A message that comes late
is mixed in at the next exchange. A neighbour whose connection breaks, or that finished
its rows, is not waited for at all.

The driver takes part at epoch boundaries only. It ends the epoch when a ``quorum`` of
the workers have trained all their rows (the others stop at their next exchange), gathers
their states, averages them (weighted by rows) for validation, callbacks and checkpoints,
and starts every worker from that average at the next epoch; so resume, checkpoints and
worker loss work as with the other strategies. A lost worker's task is dropped (the epoch
ends on the others); a silent one is left after ``timeout``.

The connections are those of :mod:`daskml_scale.training.ring`: a per-fit secret in every
handshake, TLS with the workers' certificates on a ``tls://`` cluster.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from daskml_scale import backend, config
from daskml_scale._utils.lru import LRUCache
from daskml_scale._utils.waits import run_bounded, within
from daskml_scale.exceptions import ArgumentError, TrainingError, WorkersLostError
from daskml_scale.training.allreduce import _LocalState, _rows, _steps, ports_lost, start_epoch
from daskml_scale.training.averaging import weighted_average
from daskml_scale.training.gossip_net import Node
from daskml_scale.training.ring import close_port, open_ports
from daskml_scale.training.strategy import Strategy
from daskml_scale.training.worker import model_for

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.training.runner import EpochRunner

__all__ = ["Gossip", "gossip_epoch", "neighbours", "stop_gossip", "slow_down"]

logger = logging.getLogger(__name__)

#: a worker gathers the rows of this many local rounds at once (then slices them)
_STEPS_PER_BLOCK = 64
TOPOLOGIES = ("ring", "random")
#: the first exchange of an epoch waits at least this long for the neighbours (their tasks
#: start a little apart); the later ones wait ``wait`` at most
_FIRST_WAIT_S = 0.5
#: ``wait=None`` waits twice a local round, but never longer than this
_MAX_WAIT_S = 1.0


class _GossipState:
    """Per fit: the secret of its connections and the last epoch's statistics."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(32)
        self.stats: dict[str, float] = {}


@dataclass
class Gossip(Strategy):
    """Decentralized averaging (consensus): each worker averages with its neighbours,
    directly, every ``every`` local steps, and never waits for everyone.

    Parameters
    ----------
    every : int
        Local steps between two exchanges with the neighbours.
    peers : int
        Neighbours a worker sends to (and hears from) per exchange (at most workers - 1).
    topology : {"ring", "random"}
        ``"ring"``: rank ``r`` sends to ``r + 1 .. r + peers``. ``"random"``: ``peers``
        distinct shifts drawn per round from a generator seeded by the fit's seed, the
        epoch and the round (rank ``r`` sends to ``r + shift``).
    wait : float or None
        Seconds a worker waits for an expected neighbour's message before it skips the
        exchange (counted in ``gossip_skipped``; the message is mixed in at the next
        exchange if it comes later). ``None``: twice the worker's own last local round,
        at most 1 s (the first exchange of an epoch waits at least 0.5 s, as the workers'
        tasks start a little apart). A neighbour whose messages come at a slower pace than the worker's own (a
        straggler), or are long overdue (a silent one), is not waited for at all.
    quorum : float
        The epoch ends when this fraction of the workers (rounded up, at least one) have
        trained all their rows; the others stop at their next exchange, and the rows they
        did not reach this epoch are counted in ``gossip_rows_left``. ``1.0`` (default):
        every worker trains all its rows, and a straggler sets the epoch's length (though
        nobody waits for it inside the epoch); ``0.5``: the epoch ends with the faster half,
        so a straggler costs the fit its rows left, not its time.
    timeout : float or None
        Seconds to connect to a neighbour, and how long the driver waits for the tasks
        left once one finished (a silent worker's task is then dropped, with a warning);
        default ``daskml_scale.training.ps-timeout``.

    Notes
    -----
    The History gets, per epoch: ``gossip_exchanges`` (messages mixed in, all workers),
    ``gossip_skipped`` (exchanges skipped: the neighbour was slow, finished, or lost),
    ``gossip_spread`` (the largest distance of a worker's weights from their mean,
    relative to the mean's norm, after their last local round and before the driver
    averages), ``gossip_rows_left``, ``gossip_lost`` (workers whose epoch task was lost or
    dropped) and ``gossip_max_wait_s`` (the longest a worker waited at one exchange).

    Examples
    --------
    >>> daskml_scale.fit(model, ddf, preprocessor=pre, strategy=daskml_scale.Gossip(every=16))
    """

    every: int = 16
    peers: int = 1
    topology: str = "ring"
    wait: float | None = None
    quorum: float = 1.0
    timeout: float | None = None

    name = "gossip"

    def __post_init__(self) -> None:
        if not isinstance(self.every, (int, np.integer)) or self.every < 1:
            raise ArgumentError(f"Expected every to be a positive integer. Received: every={self.every!r}")
        if not isinstance(self.peers, (int, np.integer)) or self.peers < 1:
            raise ArgumentError(f"Expected peers to be a positive integer. Received: peers={self.peers!r}")
        if self.topology not in TOPOLOGIES:
            raise ArgumentError(f"Expected topology to be one of {TOPOLOGIES}. Received: topology={self.topology!r}")
        if self.wait is not None and not (isinstance(self.wait, (int, float)) and self.wait >= 0):
            raise ArgumentError(f"Expected wait to be None or seconds >= 0. Received: wait={self.wait!r}")
        if not isinstance(self.quorum, (int, float)) or not 0 < self.quorum <= 1:
            raise ArgumentError(f"Expected 0 < quorum <= 1. Received: quorum={self.quorum!r}")

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "every": int(self.every), "peers": int(self.peers),
                "topology": self.topology, "wait": self.wait, "quorum": float(self.quorum)}

    def worker_functions(self) -> tuple[str, ...]:
        return ("local_sgd",)

    def create_state(self) -> _GossipState:
        return _GossipState()

    def _timeout(self) -> float:
        return float(self.timeout if self.timeout is not None else config.get("training.ps-timeout", 120))

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, runner: "EpochRunner") -> None:
        st: _GossipState = runner.state
        every = int(self.every)
        blocks = runner.chunks(every * max(1, _STEPS_PER_BLOCK // every))
        restarts = int(config.get("training.ps-restarts", 3))
        for attempt in range(restarts + 1):
            workers = runner.live_workers()
            if not workers:
                raise WorkersLostError("Every worker is gone; Gossip cannot go on" + runner.checkpoint_hint(),
                                       workers=sorted(runner.lost_workers))
            results, lost = self._attempt(runner, st, blocks, workers)
            done = [r for r in results if r["samples"] > 0]
            if done or not lost:
                break
            logger.warning("daskml_scale.fit: every Gossip task of epoch %d was lost (attempt %d); "
                           "restarting the epoch from the driver's copy", runner.epoch, attempt)
        else:
            raise TrainingError(f"Gossip lost every task of epoch {runner.epoch} {restarts + 1} times; "
                                "training stopped" + runner.checkpoint_hint())
        runner.note_timings(results)
        if not done:
            return
        samples = [r["samples"] for r in done]
        weights = [r["weights"] for r in done]
        runner.weights = weighted_average(weights, samples)
        runner.optimizer_state = weighted_average([r["optimizer"] for r in done], samples)
        runner.add_train_metrics([r["metrics"] for r in done], sum(samples))
        st.stats = {
            "exchanges": float(sum(r["exchanges"] for r in results)),
            "skipped": float(sum(r["skipped"] for r in results)),
            "spread": spread(weights, runner.trainable_mask),
            "rows_left": float(sum(r["rows_left"] for r in results)),
            "lost": float(lost),
            "max_wait_s": float(max(r["max_wait_s"] for r in results)),
        }
        runner.round_end()

    def _attempt(self, runner: "EpochRunner", st: _GossipState, blocks: list[list[Any]],
                 workers: list[str]) -> tuple[list[dict[str, Any]], int]:
        """One try at the epoch on ``workers`` (each stream on its home worker, every
        input held where its task runs): the results of the tasks that finished, and how
        many were lost or dropped."""
        per_rank = runner.ranks(blocks, workers)
        gid = f"{runner.fit_id}-g{runner.epoch}-{uuid.uuid4().hex[:6]}"
        client = runner.client
        futs: list[Any] = []
        state: list[Any] = []
        try:
            try:
                addresses = [(h, p) for _, h, p in open_ports(client, gid, workers, self._timeout())]
            except Exception as exc:  # a worker that left, or one that does not answer
                gone = ports_lost(runner, workers, exc)
                if gone is None:
                    raise
                gone = sorted(gone)
                raise WorkersLostError(f"Gossip: the workers did not open their ports within {self._timeout():.0f}s"
                                       + (f" ({', '.join(gone)} left)" if gone else "") + runner.checkpoint_hint(),
                                       workers=gone or sorted(workers)) from exc
            state = [runner.put_on({"weights": runner.weights, "optimizer": runner.optimizer_state}, workers,
                                   self._timeout(), "Gossip")]
            futs = [
                client.submit(
                    gossip_epoch, gid, r, addresses, st.secret, runner.fit_id, runner.model_bytes, state[0],
                    per_rank[r], runner.sources(runner.parts_of(per_rank[r])), batch_size=runner.batch_size,
                    seed=runner.seed, epoch=runner.epoch, shuffle=runner.shuffle, every=int(self.every),
                    peers=int(self.peers), topology=self.topology, wait=self.wait, timeout=self._timeout(),
                    pure=False, workers=[w], allow_other_workers=False,
                    key=(f"daskml-gossip-{runner.fit_id}", runner.epoch, gid[-6:], r),
                )
                for r, w in enumerate(workers)
            ]
            runner.round_begin()
            return self._collect(runner, futs, workers, gid)
        finally:
            client.cancel(futs + state)
            _run_bounded(client, close_port, gid, [w for w in workers if w in runner.live_workers()],
                         "Gossip: closing the epoch's ports")

    def _collect(self, runner: "EpochRunner", futs: list[Any], workers: list[str],
                 gid: str) -> tuple[list[dict[str, Any]], int]:
        """Wait for the epoch's tasks, never for everyone: stop the rest once a quorum is
        done, drop the tasks of lost workers, and leave silent ones after ``timeout``."""
        need = max(1, math.ceil(float(self.quorum) * len(futs)))
        pending = set(range(len(futs)))
        lost: set[int] = set()
        stopped = False
        first_done: float | None = None
        next_check = 0.0
        probe_at = time.monotonic() + self._timeout()
        while pending:
            for r in [r for r in pending if futs[r].done()]:
                pending.discard(r)
                if futs[r].status != "finished":
                    lost.add(r)
            now = time.monotonic()
            if now >= next_check and pending:  # an RPC to the scheduler: twice a second
                live = set(runner.live_workers())
                for r in [r for r in pending if workers[r] not in live]:
                    pending.discard(r)
                    lost.add(r)
                next_check = now + 0.5
            finished = len(futs) - len(pending) - len(lost)
            if finished and first_done is None:
                first_done = now
            if pending and not stopped and finished >= need:
                stopped = True
                _run_bounded(runner.client, stop_gossip, gid, sorted({workers[r] for r in pending}),
                             "Gossip: telling the workers left to stop")
            if pending and first_done is None and now >= probe_at:  # nothing finished for a while: who is silent?
                probe_at = now + self._timeout()
                silent = silent_workers(runner.client, sorted({workers[r] for r in pending}))
                if silent:
                    logger.warning("daskml_scale.fit: Gossip epoch %d: no task finished within %.0fs and %s did not "
                                   "answer; the epoch goes on without them", runner.epoch, self._timeout(), silent)
                    for r in [r for r in pending if workers[r] in silent]:
                        pending.discard(r)
                        lost.add(r)
            if pending and first_done is not None and now - first_done > self._timeout():
                logger.warning("daskml_scale.fit: Gossip epoch %d: the tasks of %s did not finish within %.0fs of the "
                               "first one; the epoch ends without them", runner.epoch,
                               sorted(workers[r] for r in pending), self._timeout())
                lost |= pending
                break
            if pending:
                time.sleep(0.02)
        live = set(runner.live_workers())
        for r in sorted(lost):
            if futs[r].status == "error" and workers[r] in live:  # failed on a live worker: an error, not a loss
                raise futs[r].exception(timeout=self._timeout())
        results = [futs[r].result(timeout=self._timeout()) for r in range(len(futs)) if r not in lost]
        return results, len(lost)

    def epoch_logs(self, runner: "EpochRunner") -> dict[str, float]:
        st: _GossipState = runner.state
        return {f"gossip_{k}": v for k, v in st.stats.items()}


def spread(weights: Sequence[list[np.ndarray]], mask: Sequence[bool]) -> float:
    """The largest distance of one of ``weights`` (the workers' trainable weights) from
    their mean, relative to the mean's norm."""
    flat = [np.concatenate([np.ravel(np.asarray(a, np.float64)) for a, t in zip(w, mask) if t]) for w in weights]
    mean = np.mean(flat, axis=0)
    norm = float(np.linalg.norm(mean)) or 1.0
    return float(max(np.linalg.norm(f - mean) for f in flat) / norm)


def _run_bounded(client: Any, fn: Any, gid: str, workers: list[str], what: str) -> None:
    """``client.run(fn, gid)`` on ``workers``, for at most 3 s: a silent worker (alive to
    the scheduler, not answering) must not hold the fit; its task is left after the timeout."""
    run_bounded(client, fn, gid, workers=workers, what=what)


def silent_workers(client: Any, workers: list[str], seconds: float = 5.0) -> list[str]:
    """Those of ``workers`` that do not answer a call within ``seconds``: alive to the
    scheduler (a stopped process keeps its place until its heartbeats time out), but not
    working."""
    out = []
    for w in workers:
        try:
            within(lambda w=w: client.run(_pong, workers=[w]), seconds, f"Gossip: asking {w} whether it runs", "")
        except Exception:  # noqa: BLE001  (no answer, or a failed one: either way it is not working)
            out.append(w)
    return out


def _pong() -> bool:
    return True


# ------------------------------------------------------------------- the worker side
_STOPPED: LRUCache[str, bool] = LRUCache(256)  # gossip ids told to stop
_ACTIVE: LRUCache[str, str] = LRUCache(16)  # fit id -> the gossip id of its running epoch task
_SLOW = [1.0]


def stop_gossip(gid: str) -> bool:
    """Run on a worker (``client.run``): its task of ``gid`` stops at its next exchange."""
    _STOPPED.put(gid, True)
    return True


def slow_down(factor: float) -> float:
    """Test and benchmark hook, run on one worker with ``client.run``: every compiled
    training call of that worker process then sleeps ``factor - 1`` times its own
    duration afterwards (a straggler), whatever the strategy. ``1.0`` undoes it."""
    from daskml_scale.training import worker

    def slowed(plain: Any) -> Any:
        def call(self: Any, *args: Any) -> Any:
            t = time.perf_counter()
            out = plain(self, *args)
            if _SLOW[0] > 1.0:
                time.sleep((_SLOW[0] - 1.0) * (time.perf_counter() - t))
            return out

        call.slowed = True  # type: ignore[attr-defined]
        return call

    for name in ("train", "train_round"):  # the train loop, and a round of local SGD
        plain = getattr(worker._CachedModel, name)
        if not getattr(plain, "slowed", False):
            setattr(worker._CachedModel, name, slowed(plain))
    previous, _SLOW[0] = _SLOW[0], float(factor)
    return previous


def neighbours(rank: int, n: int, round_: int, peers: int, topology: str, seed: int,
               epoch: int) -> tuple[list[int], list[int]]:
    """(ranks ``rank`` sends to, ranks it hears from) at its ``round_``-th exchange."""
    p = min(int(peers), n - 1)
    if p < 1:
        return [], []
    if topology == "ring":
        shifts = list(range(1, p + 1))
    else:
        rng = np.random.default_rng([seed, epoch, 7717, round_])
        shifts = [int(s) for s in rng.choice(np.arange(1, n), size=p, replace=False)]
    return [(rank + s) % n for s in shifts], [(rank - s) % n for s in shifts]


def gossip_epoch(
    gid: str, rank: int, addresses: list[tuple[str, int]], secret: bytes, fit_id: str, model_bytes: bytes,
    state: dict[str, Any], blocks: Sequence[Sequence[Any]], sources: dict[int, Any], *, batch_size: int, seed: int,
    epoch: int, shuffle: bool, every: int, peers: int, topology: str, wait: float | None, timeout: float,
) -> dict[str, Any]:
    """One worker's epoch: local rounds of ``every`` steps, each followed by an exchange
    with its neighbours. Returns samples, weights, optimizer and metric state, and the
    exchanges done and skipped."""
    from distributed import secede

    try:
        secede()  # waits on neighbours must not hold a slot of the worker's thread pool
    except (ValueError, KeyError):
        pass
    older = _ACTIVE.pop(fit_id)
    if older is not None:
        _STOPPED.put(older, True)  # an older epoch's task still here (a dropped one) ends now
    _ACTIVE.put(fit_id, gid)
    n = len(addresses)
    cached = model_for(fit_id, model_bytes)
    total = sum(_rows(b) for b in blocks)
    node = Node(gid, rank, addresses, secret, timeout)
    t0 = time.perf_counter()
    try:
        with cached.lock:
            model = cached.model
            start_epoch(model, state, blocks, sources, seed, epoch, shuffle)
            local = _LocalState(cached, 1.0)
            samples = rounds = 0
            round_s = 0.0
            pending: np.ndarray | None = None  # the last mix, set by the next round's call
            for X, y in _steps(blocks, sources, seed, epoch, shuffle, every * batch_size, 0):
                if _STOPPED.get(gid):
                    break
                t = time.perf_counter()
                state, pending = cached.train_round(X, y, batch_size, pending), None
                round_s = time.perf_counter() - t
                samples += len(X)
                if samples >= total:
                    break  # the driver averages next: an exchange now would be lost work
                outs, ins = neighbours(rank, n, rounds, peers, topology, seed, epoch)
                vec = local.weighed(state, 1)
                node.send(outs, rounds, vec)
                budget = float(wait) if wait is not None else min(max(2 * round_s, 0.002), _MAX_WAIT_S)
                if rounds == 0:  # the neighbours' tasks start a little apart: line up once
                    budget = max(budget, _FIRST_WAIT_S)
                for got in node.take(ins, rounds, min(budget, timeout)):
                    vec += got
                if vec[-1] > 1:
                    pending = vec[:-1] / vec[-1]
                rounds += 1
            if pending is not None:
                local.assign(pending)
            node.finish(everyone=topology == "random")
            return {
                "samples": samples, "rows_left": total - samples, "rounds": rounds,
                "exchanges": node.mixed, "skipped": node.skipped, "max_wait_s": node.max_wait_s,
                "weights": backend.get_weights(model), "optimizer": backend.get_optimizer_state(model),
                "metrics": backend.metric_state(model),
                "timings": {**cached.timings, "epoch_task_s": time.perf_counter() - t0},
            }
    finally:
        node.close()
        if _ACTIVE.get(fit_id) == gid:
            _ACTIVE.pop(fit_id)
