"""dask-ml's incremental searches on today's Dask: :func:`dask_ml_compat`.

dask-ml's ``IncrementalSearchCV``, ``HyperbandSearchCV`` and ``SuccessiveHalvingSearchCV``
(dask-ml 2025.1.0, the newest release) run their driver as a coroutine on the client's
event loop and call ``dask.persist`` there. Since dask 2025.3, ``dask.persist`` refuses a
client used from its own event loop ("Attempting to use an asynchronous Client in a
synchronous context of `dask.compute`", dask/dask-ml#1016, open), so every such search
fails before its first ``partial_fit``. Inside :func:`dask_ml_compat` those calls go to
the current client's ``Client.persist``, which submits the same graph without waiting
(what ``dask.persist`` did with a distributed client before). Nothing else changes.
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Any, Iterator

__all__ = ["dask_ml_compat"]

_LOCK = threading.Lock()
_DEPTH = [0]


class _PersistOnClient(types.ModuleType):
    """The ``dask`` module as dask-ml's incremental search sees it: ``persist`` through the client."""

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def persist(self, *args: Any, **kwargs: Any) -> Any:
        from dask.base import unpack_collections
        from distributed import default_client

        collections, repack = unpack_collections(*args)
        if not collections:
            return args
        kwargs.pop("traverse", None)
        kwargs.pop("optimize_graph", None)
        if not isinstance(kwargs.get("priority", 0), int):
            kwargs.pop("priority")  # per-collection priorities: dask.persist's form, not Client.persist's
        return repack(default_client().persist(list(collections), **kwargs))


@contextlib.contextmanager
def dask_ml_compat() -> Iterator[None]:
    """Run dask-ml's incremental searches on dask >= 2025.3 (dask/dask-ml#1016).

    Examples
    --------
    >>> from dask_ml.model_selection import HyperbandSearchCV  # doctest: +SKIP
    >>> search = HyperbandSearchCV(KerasRegressor(), {"learning_rate": [1e-4, 1e-3]}, max_iter=9)  # doctest: +SKIP
    >>> with daskml_scale.dask_ml_compat():  # doctest: +SKIP
    ...     search.fit(X, y)
    """
    import dask_ml.model_selection._incremental as incremental

    with _LOCK:
        if _DEPTH[0] == 0:
            real = incremental.dask
            incremental.dask = _PersistOnClient(real)
        _DEPTH[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0 and isinstance(incremental.dask, _PersistOnClient):
                incremental.dask = incremental.dask._real
