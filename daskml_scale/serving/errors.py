"""The server's refusals: one root carrying the HTTP status, one class per kind.

Every handler answers a :class:`ServingError` with its ``status`` and the JSON
``{"error": ..., "status": ..., "field"?: ..., "line"?: ...}`` of :meth:`ServingError.to_dict`.
Only :class:`RequestError` (the request's content is wrong: 400, 413, 415, 422) is a
:class:`~daskml_scale.exceptions.DataError`; a missing job (404) or a server that
cannot answer yet (503) are not data problems.
"""

from __future__ import annotations

from typing import Any

from daskml_scale.exceptions import DaskmlScaleError, DataError

__all__ = ["ServingError", "RequestError", "NotFoundError", "ServiceUnavailableError", "OverloadedError",
           "ClientGoneError"]


class ServingError(DaskmlScaleError):
    """A request the server answers with an HTTP error status.

    Attributes
    ----------
    status : int
        The HTTP status to answer (a class default, 500 here).
    field : str or None
        The field (column) concerned, when there is one.
    line : int or None
        The CSV line concerned (the header is line 1), when there is one.
    """

    status: int = 500

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.line = line

    def __reduce__(self) -> tuple[Any, ...]:  # keep the attributes across a process boundary
        return (_rebuild, (type(self), str(self), self.status, self.field, self.line))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """HTTP headers the answer carries besides the content type (none here)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        d: dict[str, Any] = {"error": str(self), "status": self.status}
        if self.field is not None:
            d["field"] = self.field
        if self.line is not None:
            d["line"] = self.line
        return d


class RequestError(ServingError, DataError):
    """The request's content is refused: 400 malformed or empty body, 413 too large,
    415 unsupported content type, 422 well-formed but not what the model needs.

    Also a :class:`~daskml_scale.exceptions.DataError` (and so a ``ValueError``),
    whose ``column`` is ``field``.

    Parameters
    ----------
    status : int
        The HTTP status to answer.
    message : str
        What was wrong, what was expected and what was received.
    field : str, optional
        The field (column) concerned.
    line : int, optional
        The CSV line concerned.
    """

    def __init__(self, status: int, message: str, *, field: str | None = None, line: int | None = None) -> None:
        super().__init__(message, field=field, line=line)
        self.status = status
        self.column = field


class NotFoundError(ServingError, LookupError):
    """404: no such resource (a job id the server does not know)."""

    status = 404


class ServiceUnavailableError(ServingError, RuntimeError):
    """503: the server cannot answer this yet or at all (the model is loading or failed
    to load; ``POST /jobs`` on a server without a Dask cluster)."""

    status = 503


class OverloadedError(ServiceUnavailableError):
    """503 at once, with ``Retry-After``: the request queue holds ``serve.max-queue-rows``
    rows already, so this request would wait too long (nothing of it was run)."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(max(1, round(self.retry_after))).encode())]


class ClientGoneError(ServingError, ConnectionError):
    """The client disconnected while its request waited (nginx's 499: nobody reads the answer)."""

    status = 499


def _rebuild(cls: type[ServingError], message: str, status: int, field: str | None, line: int | None) -> ServingError:
    err = cls.__new__(cls)
    ServingError.__init__(err, message, field=field, line=line)
    err.status = status
    if isinstance(err, DataError):
        err.column = field
    return err
