"""Parameter server: a Dask actor holds the weights and the optimizer; workers push gradients.

One actor (:class:`ParamServerActor`) lives on one worker for the whole fit. Every
epoch, each stream (one per worker) runs one long task, :func:`ps_epoch`, that loops
over its rows ``push_every`` batches at a time: gradients at the weights it last
received, averaged over those batches, pushed to the actor, which answers with the
weights to use next. One round trip per push. Messages are NumPy arrays: one packed
float32 vector each way (lists when a weight is not float32), sent over a direct TCP
channel to the actor (:mod:`daskml_scale.training.channel`) on ``tcp://`` clusters and
as actor calls otherwise.

* ``mode="sync"``: the actor waits for one contribution per active stream, averages
  them (weighted by rows) and applies the average with the model's optimizer: with
  ``push_every=1`` this is large-batch synchronous SGD over the union of the streams'
  batches.
* ``mode="async"``: a push is applied when it arrives, unless it was computed on
  weights more than ``max_staleness`` versions old: then it is *rejected* (counted,
  not applied) and the worker goes on from the current weights.

At the end of an epoch the driver copies the weights and the optimizer state back
from the actor, so validation, callbacks and checkpoints work as with model averaging.
When the worker hosting the actor is lost, the driver starts a new actor on a live
worker from its own copy (the state at the start of the epoch) and reruns the epoch.
When another worker is lost, Dask reruns its epoch task elsewhere and the task
resumes after the last chunk the actor received from that stream.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from daskml_scale import backend, config
from daskml_scale._utils.client import is_actor_lost
from daskml_scale.exceptions import ArgumentError, TrainingError, WorkersLostError
from daskml_scale.training.channel import ChannelClient
from daskml_scale.training.ps_actor import ParamServerActor
from daskml_scale.training.worker import PartSlice, gather_rows, model_for

from daskml_scale.training.strategy import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.training.runner import EpochRunner

__all__ = ["ParameterServer", "ParamServerActor", "ps_epoch"]

logger = logging.getLogger(__name__)


@dataclass
class ParameterServer(Strategy):
    """Train with a parameter server: a Dask actor on one worker holds the weights and
    the optimizer state and applies the workers' gradients with the model's optimizer.

    Parameters
    ----------
    mode : {"sync", "async"}
        ``"sync"``: one contribution per worker per step, averaged (weighted by rows)
        then applied; a barrier. ``"async"``: gradients are applied as they arrive.
    push_every : int
        Batches per push. A worker averages the gradients of ``push_every`` batches,
        all taken at the weights it last received, and pushes that mean: one round
        trip and one optimizer step per ``push_every`` batches (fewer, larger steps).
    local_steps : bool or None
        Async mode (Downpour): between pushes a worker applies its ``push_every`` steps
        to its own copy with its own optimizer, then pushes the accumulated change of
        the weights, which the server adds to its own. An epoch then makes as many
        updates as it has batches, whatever ``push_every``. ``None`` (default): on in
        async mode with ``push_every > 1`` (and float32 weights); ``False``: push the
        mean gradient of the ``push_every`` batches, applied with the server's optimizer.
        The workers' optimizer slots are averaged at the end of the epoch.
    max_staleness : int or None
        Async mode: a gradient computed on weights more than ``max_staleness``
        versions older than the server's is rejected (not applied, not down-weighted)
        and counted; ``None`` accepts every push. Ignored in sync mode, where every
        gradient is computed on the current weights.
    timeout : float or None
        Seconds a call to the server may take (a sync barrier included) before the
        epoch task fails; default ``daskml_scale.training.ps-timeout`` (120).

    Notes
    -----
    The History gets, per epoch, ``ps_applied`` (optimizer steps), ``ps_rejected``
    (stale pushes refused), ``ps_staleness_mean`` and ``ps_staleness_max`` (over the
    applied pushes, in versions), ``ps_direct_pushes`` (pushes that came over the
    direct TCP channel rather than as actor calls) and ``ps_restarts`` (times the
    server was restored after its worker was lost). Non-trainable weights (e.g. BatchNormalization
    statistics) stay at the server's values: only gradients travel.

    Examples
    --------
    >>> daskml_scale.fit(model, ddf, preprocessor=pre,
    ...                  strategy=daskml_scale.ParameterServer("async", push_every=8, max_staleness=2))
    """

    mode: str = "sync"
    push_every: int = 1
    max_staleness: int | None = None
    timeout: float | None = None
    local_steps: bool | None = None

    name = "parameter_server"
    #: the actor's class (a subclass can add to what the server does)
    actor_class = ParamServerActor

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "async"):
            raise ArgumentError(f"Expected mode to be 'sync' or 'async'. Received: mode={self.mode!r}")
        if not isinstance(self.push_every, (int, np.integer)) or self.push_every < 1:
            raise ArgumentError(f"Expected push_every to be a positive integer. Received: push_every={self.push_every!r}")
        if self.max_staleness is not None and (
            not isinstance(self.max_staleness, (int, np.integer)) or self.max_staleness < 0
        ):
            raise ArgumentError(
                f"Expected max_staleness to be a non-negative integer or None. Received: max_staleness={self.max_staleness!r}"
            )

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "mode": self.mode, "push_every": int(self.push_every),
                "max_staleness": self.max_staleness, "local_steps": self._local_steps()}

    def _local_steps(self) -> bool:
        if self.mode != "async":
            return False
        return bool(self.push_every > 1 if self.local_steps is None else self.local_steps)

    def steps_per_round(self) -> None:
        """The driver sees one round per epoch (the pushes happen between workers and the actor)."""
        return None

    def _timeout(self) -> float:
        return float(self.timeout if self.timeout is not None else config.get("training.ps-timeout", 120))

    def worker_functions(self) -> tuple[str, ...]:
        return ("train",) if self._local_steps() else ("gradients",)

    def create_state(self) -> "_ServerState":
        return _ServerState()

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, runner: "EpochRunner") -> None:
        st: _ServerState = runner.state
        chunks = runner.chunks(int(self.push_every))
        streams = [s for s, c in enumerate(chunks) if c]
        restarts = int(config.get("training.ps-restarts", 3))
        causes: list[BaseException] = []
        for attempt in range(restarts + 1):
            server, host = self._server(runner, st)
            server.load(runner.weights, runner.optimizer_state, streams).result(timeout=self._timeout())
            futs = [
                runner.submit(
                    ps_epoch, server, runner.fit_id, runner.model_bytes, s, chunks[s], runner.sources(runner.parts_of(chunks[s])),
                    batch_size=runner.batch_size, seed=runner.seed, epoch=runner.epoch, shuffle=runner.shuffle,
                    timeout=self._timeout(),
                    optimizer=runner.optimizer_state if self._local_steps() else None,
                    stream=s, name=f"daskml-ps-a{attempt}",
                )
                for s in streams
            ]
            runner.round_begin()
            try:
                results = self._wait(runner, futs, server, host)
                try:
                    weights, optimizer, stats = server.state().result(timeout=self._timeout())
                except (OSError, TimeoutError) as exc:  # the host died after the last push
                    raise _ServerLost(host) from exc
            except _ServerLost as lost:
                causes.append(lost.__cause__ or lost)
                st.restarts_epoch = (runner.epoch, attempt + 1)
                runner.client.cancel(futs)
                st.lost_hosts.add(host)
                # should the "lost" actor still run (a missed heartbeat), it stops listening and goes
                st.drop(wait=False)
                logger.warning(
                    "daskml_scale.fit: the parameter server's worker %s was lost in epoch %d; "
                    "restarting the epoch from the driver's copy on another worker", host, runner.epoch,
                )
                continue
            break
        else:
            raise TrainingError(
                f"The parameter server was lost {restarts + 1} times in epoch {runner.epoch}; training stopped"
                + runner.checkpoint_hint()
            ) from (causes[0] if causes else None)
        results = [r for r in results if r.get("samples", 0) > 0]
        runner.weights = weights
        local = [r for r in results if r.get("optimizer") is not None]
        if local:  # local steps: the workers' own optimizers moved, the server's did not
            from daskml_scale.training.averaging import weighted_average

            optimizer = weighted_average([r["optimizer"] for r in local], [r["samples"] for r in local])
        runner.optimizer_state = optimizer
        st.stats = stats
        if results:
            runner.add_train_metrics([r["metrics"] for r in results], sum(r["samples"] for r in results))
        runner.round_end()

    def release(self, state: "_ServerState") -> None:
        """The fit is over: close the actor and let its worker drop it now."""
        state.drop(wait=True)

    def epoch_logs(self, runner: "EpochRunner") -> dict[str, float]:
        st: _ServerState = runner.state
        logs = {f"ps_{k}": float(v) for k, v in (st.stats or {}).items()}
        epoch, restarts = st.restarts_epoch
        logs["ps_restarts"] = float(restarts if epoch == runner.epoch else 0)
        return logs

    # ------------------------------------------------------------------ the server
    def _server(self, runner: "EpochRunner", st: "_ServerState") -> tuple[Any, str]:
        """The fit's actor (made on first use, or again after its worker was lost)."""
        if st.server is not None:
            return st.server
        deadline = time.monotonic() + float(config.get("training.no-worker-timeout", 60))
        while True:
            live = [w for w in runner.live_workers() if w not in st.lost_hosts] or runner.live_workers()
            if live:
                break
            if time.monotonic() > deadline:
                raise WorkersLostError(
                    f"Every worker is gone ({sorted(runner.lost_workers)} lost); the parameter server cannot be "
                    "restarted" + runner.checkpoint_hint(),
                    workers=sorted(runner.lost_workers),
                )
            time.sleep(0.5)
        host = live[-1]
        future = runner.client.submit(
            self.actor_class, runner.model_bytes, self.mode, self.max_staleness, self._timeout(),
            bool(config.get("training.ps-direct", True)), actor=True, workers=[host], allow_other_workers=False,
            key=f"daskml-ps-server-{runner.fit_id}-{uuid.uuid4().hex[:6]}",
        )
        actor = future.result(timeout=self._timeout())
        st.server = (actor, host)
        st.future = future  # keeps the actor alive for the fit
        return actor, host

    def _wait(self, runner: "EpochRunner", futs: list[Any], server: Any, host: str) -> list[dict[str, Any]]:
        while not runner.wait(futs, 0.5):
            if host not in runner.live_workers():
                raise _ServerLost(host)
        failed = [f for f in futs if f.status != "finished"]
        if failed:
            errors = [_task_error(f) for f in failed]
            # the scheduler fails the tasks that hold the actor when its worker is lost
            if host not in runner.live_workers() or any(is_actor_lost(e) for e in errors) or not _alive(server):
                raise _ServerLost(host) from next((e for e in errors if e is not None), None)
        try:
            return runner.gather(futs)
        except RuntimeError as exc:
            if is_actor_lost(exc):
                raise _ServerLost(host) from exc
            raise


class _ServerState:
    """Per fit: the actor, the hosts it was lost on, the last epoch's push statistics."""

    def __init__(self) -> None:
        self.server: tuple[Any, str] | None = None
        self.future: Any = None
        self.lost_hosts: set[str] = set()
        self.stats: dict[str, float] | None = None
        self.restarts_epoch: tuple[int | None, int] = (None, 0)

    def drop(self, *, wait: bool) -> None:
        """Close the fit's actor (it refuses pushes, wakes the waiting ones, stops listening)
        and cancel its key for every holder.

        Every actor call leaves its handle in a reference cycle (the call's closure refers
        to itself), so the handles, which keep the actor's key wanted, would live until the
        garbage collector runs. ``wait=False`` does not wait for the close (its worker may
        be gone).
        """
        have, future = self.server, self.future
        self.server, self.future = None, None
        if have is not None:
            try:
                closing = have[0].close()
                if wait:
                    closing.result(timeout=5)
            except Exception:
                pass  # its worker is gone, and the actor with it
        if future is not None:
            try:
                future.client.cancel([future], force=True)
            except Exception:
                pass  # the client is closing


class _ServerLost(Exception):
    """The worker that hosts the actor is gone (internal: the driver restarts the epoch)."""


def _task_error(future: Any) -> BaseException | None:
    """The error a failed task raised (None when it cannot be fetched in time: a lost worker)."""
    try:
        return future.exception(timeout=5)
    except Exception as exc:
        return exc


def _alive(server: Any) -> bool:
    try:
        server.ping().result(timeout=5)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------- the task
def ps_epoch(
    server: Any,
    fit_id: str,
    model_bytes: bytes,
    stream: int,
    chunks: Sequence[Sequence[PartSlice]],
    sources: dict[int, Any],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    timeout: float,
    optimizer: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """One stream's epoch against the parameter server: pull, gradients, push, repeat.

    With ``optimizer`` given (local steps, async mode), each chunk's batches are applied
    to the worker's own copy with its own optimizer (starting from those slots) and the
    change of the weights is pushed instead of a gradient.

    The task leaves the worker's thread pool (``secede``) while it runs, so a rerun of
    another stream's task can start on this worker while this one waits at a barrier.
    Returns the rows trained on, the summed metric state and, with local steps, the
    worker's optimizer slots.
    """
    from distributed import secede

    try:
        secede()
    except (ValueError, KeyError):
        pass  # not on a worker (a local test call)
    cached = model_for(fit_id, model_bytes)
    # weights and gradients stay packed (one float32 vector each way) when the server packs them
    start, weights, version, address, token = server.begin(stream).result(timeout=timeout)
    local = optimizer is not None and isinstance(weights, np.ndarray)
    link = ChannelClient.open(address, timeout)
    samples = 0
    metrics: list[list[np.ndarray]] | None = None
    primed = False
    try:
        for i in range(start, len(chunks)):
            X, y = gather_rows(chunks[i], sources, seed, epoch, shuffle)
            if len(X) == 0:
                continue
            with cached.lock:
                model = cached.model
                backend.ensure_built(model, X, y)
                if local:
                    if not primed:
                        backend.set_optimizer_state(model, optimizer)
                        backend.reset_metrics(model)
                        primed = True
                    shapes = [tuple(v.shape) for v in model.weights]
                    backend.set_weights(model, backend.unpack(weights, shapes))
                    cached.train(X, y, batch_size)
                    values = backend.pack(backend.get_weights(model)) - weights
                else:
                    values, m = cached.grad_loop_fn(X, y, batch_size, weights)
                    values = values if isinstance(values, np.ndarray) else backend.pack(values)
            if link is not None and isinstance(values, np.ndarray):
                weights, version, _ = link.push(stream, i, values, len(X), version, token, delta=local)
            else:
                weights, version, _ = server.push(
                    stream, i, values, len(X), version, token, delta=local
                ).result(timeout=timeout + 30)
            samples += len(X)
            if not local:
                metrics = m if metrics is None else [[a + b for a, b in zip(ma, mb)] for ma, mb in zip(metrics, m)]
        out_optimizer = None
        if local and primed:
            with cached.lock:
                metrics = backend.metric_state(cached.model)
                out_optimizer = backend.get_optimizer_state(cached.model)
    finally:
        if link is not None:
            link.close()
    server.done(stream, token).result(timeout=timeout)
    if metrics is None:
        return {"samples": 0}
    return {"samples": samples, "metrics": metrics, "optimizer": out_optimizer}
