"""Bounded waits on the cluster: each wait ends, at the latest with an error naming workers.

The bound is ``daskml_scale.predict.wait-timeout`` (seconds). It bounds the time without
progress, not the whole job: :func:`completed` allows that long between two results.
Every ``.scatter(``, ``.gather(``, ``.result(``, ``wait(`` and ``as_completed(`` of the
package passes a ``timeout`` or is marked ``# wait-bounded: <why>`` (``tests/test_waits.py``
checks it).
"""

from __future__ import annotations

import logging

import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

from daskml_scale import config
from daskml_scale.exceptions import ClusterTimeoutError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client, Future

__all__ = ["wait_timeout", "completed", "stalled_error", "result", "within"]

T = TypeVar("T")

_SCHEDULER_TIMEOUT = 10.0  # seconds for the scheduler to say who runs what, when a wait has timed out


def wait_timeout() -> float:
    """``daskml_scale.predict.wait-timeout``, in seconds."""
    from dask.utils import parse_timedelta

    return float(parse_timedelta(config.get("predict.wait-timeout", 1800), default="s"))


def completed(futures: Sequence["Future"], timeout: float) -> Iterator["Future"]:
    """The futures in the order they finish (done, failed or cancelled).

    Raises
    ------
    queue.Empty
        None of those left finished within ``timeout`` seconds of the previous one
        (or of the call); the caller turns it into a :func:`stalled_error`.
    """
    done: queue.SimpleQueue[Future] = queue.SimpleQueue()
    for fut in futures:
        fut.add_done_callback(done.put)  # called in a thread of distributed's, also when it is done already
    for _ in range(len(futures)):
        yield done.get(timeout=timeout)


def _processing(client: "Client") -> dict[str, list[str]]:
    """worker -> keys it runs, as the scheduler says within a few seconds ({} otherwise)."""
    try:
        info = client.sync(client.scheduler.processing, workers=None, callback_timeout=_SCHEDULER_TIMEOUT)
    except Exception:  # noqa: BLE001  (a scheduler that does not answer is part of the problem reported)
        return {}
    return {str(w): [str(k) for k in keys] for w, keys in (info or {}).items()}


def stalled_error(
    client: "Client", pending: dict[Any, str], timeout: float, what: str, advice: str
) -> ClusterTimeoutError:
    """The error for a wait that saw nothing finish within ``timeout`` seconds.

    Parameters
    ----------
    pending : dict
        Future (or key) -> a name for it (a file name), for those still waited for.
    what : str
        What was waited for, as the start of the message (``"predict_files: no file"``).
    advice : str
        What to do, as the end of the message.
    """
    by_key = {str(getattr(f, "key", f)): name for f, name in pending.items()}
    running: dict[str, list[str]] = {}
    for worker, keys in _processing(client).items():
        names = [by_key[k] for k in keys if k in by_key]
        if names:
            running[worker] = names
    placed = {n for names in running.values() for n in names}
    waiting = [n for n in by_key.values() if n not in placed]
    parts = [f"{w} runs {len(n)} ({', '.join(n[:3])}{', ...' if len(n) > 3 else ''})" for w, n in sorted(running.items())]
    if waiting:
        parts.append(
            f"{len(waiting)} wait for a worker or for data from one ({', '.join(waiting[:3])}{', ...' if len(waiting) > 3 else ''})"
        )
    return ClusterTimeoutError(
        f"{what} finished within {timeout:g} s (daskml_scale.predict.wait-timeout). Still waiting: "
        f"{'; '.join(parts) if parts else 'the scheduler did not say where'}. {advice}",
        workers=sorted(running), timeout=timeout,
    )


def result(future: "Future", *, timeout: float, what: str) -> Any:
    """``future.result()`` within ``timeout`` seconds (fetching it from its worker included)."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError as exc:
        if isinstance(exc, ClusterTimeoutError):
            raise
        holders = _holders(future.client, future.key)
        raise ClusterTimeoutError(
            f"{what}: the result of {future.key!r} could not be fetched from "
            f"{' or '.join(holders) if holders else 'its worker'} within {timeout:g} s "
            "(daskml_scale.predict.wait-timeout). Check that the worker is alive and reachable "
            "(client.scheduler_info()), then run again.",
            workers=holders, timeout=timeout,
        ) from exc


def _holders(client: "Client", key: Any) -> list[str]:
    """The workers that hold ``key``, as the scheduler says within a few seconds ([] otherwise)."""
    try:
        info = client.sync(client.scheduler.who_has, keys=[key], callback_timeout=_SCHEDULER_TIMEOUT)
    except Exception:  # noqa: BLE001
        return []
    return sorted(str(w) for w in (info or {}).get(key, ()))


def within(fn: Callable[[], T], timeout: float, what: str, advice: str, client: "Client | None" = None) -> T:
    """``fn()``, for a call of distributed's that takes no timeout, given ``timeout`` seconds.

    ``fn`` runs in a daemon thread; past the bound the caller gets a
    :class:`ClusterTimeoutError` naming the cluster's workers (the thread is left to finish).
    """
    box: dict[str, Any] = {}
    finished = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (raised again in the caller's thread)
            box["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=run, name="daskml-bounded-call", daemon=True).start()
    if not finished.wait(timeout=timeout):
        workers = _workers(client) if client is not None else []
        raise ClusterTimeoutError(
            f"{what} did not finish within {timeout:g} s (daskml_scale.predict.wait-timeout); the workers: "
            f"{', '.join(workers) if workers else 'unknown (the scheduler did not say)'}. {advice}",
            workers=workers, timeout=timeout,
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _workers(client: "Client") -> list[str]:
    """The workers' addresses, as the scheduler says within a few seconds ([] otherwise)."""
    try:
        info = client.sync(client.scheduler.identity, callback_timeout=_SCHEDULER_TIMEOUT)
    except Exception:  # noqa: BLE001
        return []
    return sorted(str(w) for w in (info or {}).get("workers", {}))


def run_bounded(client: "Client", fn: Callable[..., Any], *args: Any, workers: list[str], what: str,
                seconds: float = 3.0) -> None:
    """``client.run(fn, *args)`` on ``workers``, for at most ``seconds``; a failure or a
    timeout is logged, never raised: for housekeeping (closing an epoch's ports, telling
    tasks to stop) that a silent worker, alive to the scheduler but not answering, must
    not hold up."""
    try:
        within(lambda: client.run(fn, *args, workers=workers), seconds, what, "The fit goes on without them.", client)
    except Exception as exc:
        logging.getLogger("daskml_scale.fit").warning("daskml_scale.fit: %s on %s failed: %s", what, workers, exc)
