"""The parameter server's actor: the weights, the optimizer and the step counter of one
fit, on one worker (see :mod:`daskml_scale.training.parameter_server`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from typing import Any, Callable, Sequence

import numpy as np

from daskml_scale import backend
from daskml_scale.exceptions import ArgumentError, TrainingError
from daskml_scale.training.channel import ChannelServer, channel_host

__all__ = ["ParamServerActor"]

logger = logging.getLogger(__name__)


class ParamServerActor:
    """The weights, the optimizer and the step counter of one fit, on one worker.

    Pushes arrive on the direct channel (:mod:`daskml_scale.training.channel`, one
    thread per stream) or as actor calls (``push``, run on a thread of the actor's own
    pool so a sync push waiting at the barrier holds no event loop). Either way they
    meet in :meth:`_push`, under one lock: a sync push waits on a condition until the
    step that holds its gradient is applied; the optimizer step itself is one
    compiled graph call.
    """

    def __init__(
        self, model_bytes: bytes, mode: str, max_staleness: int | None, timeout: float, direct: bool = True
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from daskml_scale.custom_objects import load_shipped_model

        self.model = load_shipped_model(model_bytes)  # bytes (and custom objects) from our own driver
        self.apply = backend.make_apply_fn(self.model)
        self._grad_shapes = [tuple(v.shape) for v in self.model.trainable_weights]
        self._grad_size = sum(int(np.prod(sh)) for sh in self._grad_shapes)
        self._shapes = [tuple(v.shape) for v in self.model.weights]
        self._weights_size = sum(int(np.prod(sh)) for sh in self._shapes)
        self._packed: Any = None  # the current weights, packed once per version
        self.mode = mode
        self.max_staleness = max_staleness
        self.timeout = timeout
        self.version = 0
        self._weights: list[np.ndarray] | None = None
        self._pending: dict[int, tuple[Any, int]] = {}
        self._active: set[int] = set()
        self._next_chunk: dict[int, int] = {}
        # fencing: every (re)started epoch task gets a token from begin(); a push or done()
        # with another stream's older token comes from a task that was superseded (rerun
        # elsewhere, or left over from an earlier epoch) and is refused
        self._tokens: dict[int, int] = {}
        self._last_token = 0
        self._generation = 0  # bumped by load() and close(): waiting pushes of the old one give up
        self._closed = False
        self._cond = threading.Condition()
        # actor-call pushes wait at the sync barrier on these threads: one per stream at least
        self._pool_size = 64
        self._pool = ThreadPoolExecutor(max_workers=self._pool_size, thread_name_prefix="daskml-ps-push")
        self._channel = self._open_channel() if direct else None
        self._reset_stats()

    def _open_channel(self) -> ChannelServer | None:
        try:
            from distributed import get_worker

            host = channel_host(get_worker().address)
        except ValueError:  # not on a worker (a local test call)
            host = None
        if host is None:
            return None
        try:
            return ChannelServer(host, self, "_push_direct", max_values=max(self._grad_size, self._weights_size))
        except OSError as exc:
            logger.warning("daskml_scale: the parameter server's direct channel could not listen on %s (%s); "
                           "pushes go through actor calls", host, exc)
            return None

    def _reset_stats(self) -> None:
        self.stats = {"applied": 0, "rejected": 0, "staleness_sum": 0, "staleness_max": 0, "direct": 0}

    def ping(self) -> bool:
        return True

    def channel(self) -> tuple[str, int, bytes] | None:
        """The direct channel's (host, port, secret), or None when pushes go through actor calls."""
        return self._channel.endpoint if self._channel is not None else None

    def close(self) -> None:
        """The fit is over: refuse pushes, wake the ones waiting, stop listening."""
        with self._cond:
            self._closed = True
            self._generation += 1
            self._cond.notify_all()
        if self._channel is not None:
            self._channel.close()
        self._pool.shutdown(wait=False)

    def load(self, weights: list[np.ndarray], optimizer: list[np.ndarray] | None, streams: Sequence[int]) -> int:
        """Start an epoch from the driver's state: ``streams`` take part in it."""
        from concurrent.futures import ThreadPoolExecutor

        with self._cond:
            backend.set_weights(self.model, weights)
            if optimizer:
                backend.set_optimizer_state(self.model, optimizer)
            self._weights = None
            self._packed = None
            self._pending.clear()
            self._active = set(int(s) for s in streams)
            self._next_chunk = {int(s): 0 for s in streams}
            self._tokens.clear()
            self._generation += 1
            self._cond.notify_all()  # pushes still waiting from an earlier epoch give up
            self._reset_stats()
            if self._pool_size < 2 * len(self._active) + 8:
                self._pool_size = 2 * len(self._active) + 8
                old, self._pool = self._pool, ThreadPoolExecutor(
                    max_workers=self._pool_size, thread_name_prefix="daskml-ps-push")
                old.shutdown(wait=False)
            return self.version

    def _current(self) -> list[np.ndarray]:
        if self._weights is None:
            if self._packed is not None:
                self._weights = backend.unpack(self._packed, self._shapes)
            else:
                self._weights = backend.get_weights(self.model)
        return self._weights

    def _current_packed(self) -> Any:
        if self._packed is None:
            self._packed = backend.pack(self._current())
        return self._packed

    def begin(self, stream: int) -> tuple[int, Any, int, tuple[str, int] | None, int]:
        """Where a stream's (possibly rerun) epoch task starts, the weights to use, their
        version, the direct channel's address (None: push through actor calls) and the
        task's token (any earlier task of the stream is superseded from now on)."""
        with self._cond:
            packed = self._current_packed()
            address = self.channel() if isinstance(packed, np.ndarray) else None
            self._last_token += 1
            self._tokens[int(stream)] = self._last_token
            return self._next_chunk.get(int(stream), 0), packed, self.version, address, self._last_token

    def _step(self, gradients: Any) -> None:
        """One optimizer step; packed gradients (one vector) give packed weights back."""
        out = self.apply(gradients)
        if isinstance(out, np.ndarray):
            self._packed, self._weights = out, None
        else:
            self._weights, self._packed = out, None
        self.version += 1
        self.stats["applied"] += 1

    def _maybe_step(self) -> None:
        """Sync: apply the rows-weighted mean once every active stream has contributed."""
        if not self._pending or not self._active <= set(self._pending):
            return
        total = float(sum(n for _, n in self._pending.values()))
        contributions = list(self._pending.values())
        first, n0 = contributions[0]
        mean: Any
        if isinstance(first, np.ndarray):  # packed: one vector operation per contribution
            mean = first * np.float32(n0 / total)
            for grads, n in contributions[1:]:
                mean += np.float32(n / total) * grads
        else:
            mean = [np.asarray(g) * np.asarray(n0 / total, dtype=np.asarray(g).dtype) for g in first]
            for grads, n in contributions[1:]:
                for i, g in enumerate(grads):
                    mean[i] += np.asarray(n / total, dtype=mean[i].dtype) * g
        self._pending.clear()
        self._step(mean)
        self._cond.notify_all()

    async def push(
        self, stream: int, chunk: int, gradients: Any, rows: int, version: int, token: int, delta: bool = False
    ) -> tuple[Any, int, bool]:
        """A stream's gradient (mean over ``rows`` rows at weights ``version``), or with
        ``delta`` the change its local steps made, as an actor call: see :meth:`_push`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, functools.partial(self._push, stream, chunk, gradients, rows, version, token, delta=delta)
        )

    def _push_direct(
        self, stream: int, chunk: int, gradients: np.ndarray, rows: int, version: int, token: int, delta: bool = False
    ) -> tuple[Any, int, bool]:
        """A push that came over the direct channel."""
        return self._push(stream, chunk, gradients, rows, version, token, direct=True, delta=delta)

    def _add_delta(self, delta: np.ndarray) -> None:
        """Local steps (Downpour): the server's weights move by a worker's change."""
        self._packed = self._current_packed() + delta
        self._weights = None
        backend.set_weights(self.model, backend.unpack(self._packed, self._shapes))
        self.version += 1
        self.stats["applied"] += 1

    def _check_token(self, stream: int, token: int, generation: int) -> None:
        if self._closed:
            raise TrainingError("The parameter server is closed: the fit is over")
        if self._generation != generation or self._tokens.get(stream) != int(token):
            raise TrainingError(
                f"Stream {stream}'s epoch task was superseded (rerun elsewhere, or a new epoch began); "
                "its push is refused"
            )

    def _push(
        self, stream: int, chunk: int, gradients: Any, rows: int, version: int, token: int,
        direct: bool = False, delta: bool = False,
    ) -> tuple[Any, int, bool]:
        """``gradients`` may be packed (:func:`backend.pack`); the weights come back packed.
        With ``delta`` (async mode only) they are a packed change of every weight, added
        to the server's. Returns the weights to use next, their version, and whether it
        was applied. A push from a superseded task (see :meth:`begin`) raises
        :class:`TrainingError`."""
        stream = int(stream)
        if delta:
            if self.mode != "async" or not isinstance(gradients, np.ndarray) or gradients.size != self._weights_size:
                raise ArgumentError(
                    f"Expected a packed change of {self._weights_size} weights in async mode. "
                    f"Received: {np.size(gradients)} values in {self.mode} mode"
                )
        elif isinstance(gradients, np.ndarray):
            if gradients.size != self._grad_size:
                raise ArgumentError(f"Expected packed gradients for shapes {self._grad_shapes}. Received: {gradients.size} values")
        else:
            gradients = backend.pack(list(gradients))  # every contribution alike (packed when float32)
        with self._cond:
            generation = self._generation
            self._check_token(stream, token, generation)
            self.stats["direct"] += bool(direct)
            if self.mode == "async":
                self._next_chunk[stream] = chunk + 1
                stale = self.version - int(version)
                if self.max_staleness is not None and stale > self.max_staleness:
                    self.stats["rejected"] += 1
                    return self._current_packed(), self.version, False
                if delta:
                    self._add_delta(gradients)
                else:
                    self._step(gradients)
                self.stats["staleness_sum"] += stale
                self.stats["staleness_max"] = max(self.stats["staleness_max"], stale)
                return self._current_packed(), self.version, True
            # sync: a rerun task may push before the step holding its previous chunk is applied
            self._wait_for(lambda: stream not in self._pending, generation)
            self._check_token(stream, token, generation)  # superseded while it waited?
            self._next_chunk[stream] = chunk + 1
            self._pending[stream] = (gradients, int(rows))
            start = self.version
            self._maybe_step()
            self._wait_for(lambda: self.version != start, generation)
            return self._current_packed(), self.version, True

    def _wait_for(self, predicate: Callable[[], bool], generation: int) -> None:
        """Wait (the lock released) until ``predicate``; a new epoch or a close ends the wait
        with a TrainingError for the waiting push."""
        if not self._cond.wait_for(lambda: predicate() or self._generation != generation, timeout=self.timeout):
            missing = sorted(self._active - set(self._pending))
            raise TrainingError(
                f"The parameter server's sync barrier waited {self.timeout:.0f}s for stream(s) {missing}; "
                "a worker may be lost without its task being rerun. Raise daskml_scale.training.ps-timeout "
                "or use mode='async'."
            )
        if self._generation != generation:
            raise TrainingError("The parameter server started a new epoch or closed while this push waited")

    def done(self, stream: int, token: int) -> None:
        """A stream finished its epoch: the barrier no longer waits for it (unless the
        task that says so was superseded)."""
        with self._cond:
            if self._tokens.get(int(stream)) != int(token):
                return
            self._active.discard(int(stream))
            if self.mode == "sync":
                self._maybe_step()

    def state(self) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, float]]:
        """Weights, optimizer state and this epoch's push statistics (back to the driver)."""
        with self._cond:
            s = self.stats
            stats = {
                "applied": s["applied"], "rejected": s["rejected"],
                "staleness_mean": s["staleness_sum"] / s["applied"] if s["applied"] else 0.0,
                "staleness_max": s["staleness_max"], "direct_pushes": s["direct"],
            }
            return self._current(), backend.get_optimizer_state(self.model), stats
