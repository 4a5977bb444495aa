"""The settings of one served application, in one frozen value.

:func:`~daskml_scale.serving.create_app` and :func:`~daskml_scale.serving.serve` take
them as keyword arguments (their public signatures), build one :class:`ServeOptions`
with :meth:`ServeOptions.from_config` and pass it down to the application.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from daskml_scale.config import get as _config_get
from daskml_scale.dropped_rows import check_on_dropped

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["ServeOptions"]

# option -> (dask.config key under daskml_scale, fallback when the key is unset)
_CONFIG_DEFAULTS: dict[str, tuple[str, Any]] = {
    "max_batch_rows": ("serve.max-batch-rows", 2048),
    "max_wait_ms": ("serve.max-wait-ms", 2),
    "max_body_bytes": ("serve.max-body-bytes", 10 * 2**20),
    "max_queue_rows": ("serve.max-queue-rows", 8192),
    "numpy_forward": ("serve.numpy-forward", True),
    "id_column": ("serve.id-column", None),
    "on_dropped": ("predict.on-dropped", "keep"),
    "jobs_allow_read": ("serve.jobs.allow-read", ()),
    "jobs_allow_write": ("serve.jobs.allow-write", ()),
}


@dataclass(frozen=True)
class ServeOptions:
    """How an application serves a bundle (see :func:`daskml_scale.serving.create_app`).

    Attributes
    ----------
    scheduler : str or None
        Dask scheduler address for ``POST /jobs`` (connected on the first job).
    storage_options : dict or None
        fsspec options for the bundle URL and the jobs' URLs.
    max_batch_rows : int
        Most rows in one coalesced model call (``serve.max-batch-rows``).
    max_wait_ms : float
        Longest wait to fill a batch (``serve.max-wait-ms``).
    micro_batching : bool
        ``False``: one model call per request.
    numpy_forward : bool
        A small Dense model's batches go through its NumPy form
        (:mod:`daskml_scale.serving.forward`; ``serve.numpy-forward``); ``False``: always
        the Keras backend.
    max_body_bytes : int
        Larger request bodies are refused with 413 (``serve.max-body-bytes``).
    max_queue_rows : int
        Most rows waiting for the model; beyond, 503 with ``Retry-After`` at once
        (``serve.max-queue-rows``; 0: unbounded).
    id_column : str or None
        A field copied from each input row to its prediction (``serve.id-column``).
    transform : callable or None
        The preprocessor's transform when the bundle cannot import it by name.
    safe_mode : bool
        Keras safe loading.
    warmup : bool
        One prediction on a made-up row after loading.
    freeze_gc : bool
        ``gc.freeze()`` and a higher threshold for the youngest generation after loading
        (:func:`~daskml_scale.serving.collector.tune_collector`).
    on_dropped : {"keep", "omit", "error"}
        Rows the transform drops (``predict.on-dropped``): ``"keep"`` answers them
        with ``null`` predictions, ``"dropped": true`` and the reason; ``"omit"``
        leaves them out of the answer; ``"error"`` refuses the request with 422.
        Also the default of ``POST /jobs``.
    model_name : str or None
        The name the protocol endpoints serve the bundle under (``/v2/models/NAME``,
        ``/v1/models/NAME``); default: the bundle file's name without ``.bundle``, or
        ``model`` for a bundle given as an object.
    token : str or None
        The bearer token every request but the health checks must carry
        (:mod:`daskml_scale.serving.auth`); ``None``: the server is open and jobs are off.
    jobs_allow_read, jobs_allow_write : tuple of str
        URL prefixes ``POST /jobs`` may read from and write to (``serve.jobs.allow-read``,
        ``serve.jobs.allow-write``); jobs are off unless both are set and a token is.
    """

    scheduler: str | None = None
    storage_options: dict[str, Any] | None = None
    max_batch_rows: int = 2048
    max_wait_ms: float = 2.0
    micro_batching: bool = True
    numpy_forward: bool = True
    max_body_bytes: int = 10 * 2**20
    max_queue_rows: int = 8192
    id_column: str | None = None
    transform: "Callable[[pd.DataFrame], pd.DataFrame] | None" = None
    safe_mode: bool = True
    warmup: bool = True
    freeze_gc: bool = False
    on_dropped: str = "keep"
    model_name: str | None = None
    token: str | None = field(default=None, repr=False)
    jobs_allow_read: tuple[str, ...] = ()
    jobs_allow_write: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_dropped", check_on_dropped(self.on_dropped))
        object.__setattr__(self, "max_batch_rows", int(self.max_batch_rows))
        object.__setattr__(self, "max_wait_ms", float(self.max_wait_ms))
        object.__setattr__(self, "max_body_bytes", int(self.max_body_bytes))
        for name in ("jobs_allow_read", "jobs_allow_write"):
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v or ()))

    @classmethod
    def from_config(cls, **options: Any) -> ServeOptions:
        """Options from keyword arguments; those given as ``None`` or not at all take the
        ``daskml_scale.serve.*`` defaults of :mod:`dask.config`, read now.

        Parameters
        ----------
        **options :
            Any field of :class:`ServeOptions`, and ``token_file`` (see
            :func:`daskml_scale.serving.auth.load_token`).

        Returns
        -------
        ServeOptions

        Raises
        ------
        TypeError
            An option that is not a field.

        Examples
        --------
        >>> import dask.config
        >>> with dask.config.set({"daskml_scale.serve.max-wait-ms": 5}):
        ...     ServeOptions.from_config(max_batch_rows=512).max_wait_ms
        5.0
        """
        from daskml_scale.serving.auth import load_token

        values = dict(options)
        values["token"] = load_token(values.get("token"), values.pop("token_file", None))
        for name, (key, fallback) in _CONFIG_DEFAULTS.items():
            if values.get(name) is None:
                values[name] = _config_get(key, fallback)
        return cls(**values)
