"""The error hierarchy of daskml_scale.

Every error is a :class:`DaskmlScaleError` and also a built-in exception, so code
that already catches ``ValueError`` or ``RuntimeError`` keeps working. Messages say
what was expected, what was received and what to do; errors about input rows carry
the file, the line and the column as typed attributes.
"""

from __future__ import annotations

__all__ = [
    "DaskmlScaleError",
    "DaskmlScaleWarning",
    "ArgumentError",
    "ClusterError",
    "NoClusterError",
    "ClusterTimeoutError",
    "GPUUnavailableError",
    "DataError",
    "MissingColumnError",
    "BadRowError",
    "EmptyFileError",
    "NonFiniteValueError",
    "NotFittedError",
    "BundleError",
    "UnsafeBundleError",
    "TrainingError",
    "WorkersLostError",
]


class DaskmlScaleError(Exception):
    """Base class of every error raised by daskml_scale."""


class DaskmlScaleWarning(UserWarning):
    """Base class of every warning issued by daskml_scale (the tests make it an error)."""


class ArgumentError(DaskmlScaleError, ValueError):
    """An argument has a value the function cannot use (the message names it and the
    values it accepts)."""


# --------------------------------------------------------------------------- cluster
class ClusterError(DaskmlScaleError, RuntimeError):
    """The cluster could not be started, reached or used."""


class NoClusterError(ClusterError, ValueError):
    """A call needs a Dask cluster and there is no current client (a ``ValueError`` too,
    as ``distributed.get_client()`` raises)."""


class ClusterTimeoutError(ClusterError, TimeoutError):
    """A wait on the cluster ran past its bound (``daskml_scale.predict.wait-timeout``).

    Attributes
    ----------
    workers : list of str
        Addresses of the workers that held or ran what was waited for (empty when
        it was waiting for a worker, or the scheduler did not say).
    timeout : float
        The bound, in seconds.
    """

    def __init__(self, message: str, *, workers: list[str] | None = None, timeout: float = 0.0) -> None:
        super().__init__(message)
        self.workers = list(workers or [])
        self.timeout = float(timeout)

    def __reduce__(self):
        return (type(self), (str(self),), {"workers": self.workers, "timeout": self.timeout})


class GPUUnavailableError(ClusterError):
    """GPU workers were asked for but cannot be started.

    Attributes
    ----------
    reason : str
        ``"dask-cuda-missing"`` or ``"no-gpu"``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------ data
class DataError(DaskmlScaleError, ValueError):
    """Input data does not have the expected shape, type or content.

    Attributes
    ----------
    path : str or None
        The file the problem was found in, when known.
    line : int or None
        1-based line number in that file (the header is line 1), when known.
    column : str or None
        The column concerned, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.column = column

    def __reduce__(self):  # keep attributes when the error crosses a process boundary
        return (
            _rebuild_data_error,
            (type(self), str(self), self.path, self.line, self.column),
        )


def _rebuild_data_error(cls, message, path, line, column):
    err = cls.__new__(cls)
    DataError.__init__(err, message, path=path, line=line, column=column)
    return err


class MissingColumnError(DataError, KeyError):
    """A required column is absent."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class BadRowError(DataError):
    """A row cannot be parsed: wrong number of fields, text in a numeric column, ..."""


class EmptyFileError(DataError):
    """A file has no header or no rows."""


class NonFiniteValueError(DataError):
    """NaN or inf in a feature where the policy says error."""


class NotFittedError(DaskmlScaleError, ValueError, AttributeError):
    """An object was used before ``fit`` was called on it."""


# ---------------------------------------------------------------------------- bundle
class BundleError(DaskmlScaleError, ValueError):
    """A bundle file is corrupt, incomplete or from an incompatible version."""


class UnsafeBundleError(BundleError):
    """A bundle holds code (e.g. a Lambda layer) and ``safe_mode`` is on."""


# -------------------------------------------------------------------------- training
class TrainingError(DaskmlScaleError, RuntimeError):
    """Distributed training cannot go on."""


class WorkersLostError(TrainingError):
    """Every worker that could run the job is gone.

    Attributes
    ----------
    workers : list of str
        Addresses of the workers that were lost.
    """

    def __init__(self, message: str, *, workers: list[str] | None = None) -> None:
        super().__init__(message)
        self.workers = list(workers or [])

    def __reduce__(self):
        return (type(self), (str(self),), {"workers": self.workers})
