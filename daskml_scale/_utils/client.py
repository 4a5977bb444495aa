"""Finding the Dask client a call should use (``client=None`` means the current one)."""

from __future__ import annotations

from typing import Any

__all__ = ["default_client", "is_actor_lost"]


def default_client(client: Any = None, *, purpose: str | None = None) -> Any:
    """``client`` itself, or the current client (``distributed.get_client()``).

    Parameters
    ----------
    client : distributed.Client or None
    purpose : str or None
        What needs the cluster, for the error (``"fit()"``). ``None``: return ``None``
        instead of raising when there is no client.

    Raises
    ------
    NoClusterError
        There is no current client and ``purpose`` was given.
    """
    if client is not None:
        return client
    from distributed import get_client

    try:
        return get_client()
    except ValueError as exc:
        if purpose is None:
            return None
        from daskml_scale.exceptions import NoClusterError

        raise NoClusterError(
            f"{purpose} needs a Dask cluster: pass client=daskml_scale.connect(...) or create a Client first"
        ) from exc


def is_actor_lost(exc: BaseException | None) -> bool:
    """Whether ``exc`` says that the worker holding a Dask actor is gone.

    distributed raises a plain ``RuntimeError`` for it, from ``Actor.__getattr__``
    (``distributed/actor.py``): "Worker holding Actor was lost.  Status: ...". Nothing
    else marks it, so this is the one place the text is matched; a lost connection to
    that worker (``CommClosedError``, an ``OSError``) means the same.
    """
    if exc is None:
        return False
    try:
        from distributed.comm.core import CommClosedError
    except ImportError:  # pragma: no cover - distributed moved it
        CommClosedError = OSError  # type: ignore[misc,assignment]
    if isinstance(exc, (CommClosedError, ConnectionError)):
        return True
    return isinstance(exc, RuntimeError) and "Actor" in str(exc) and "lost" in str(exc)
