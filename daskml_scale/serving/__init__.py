"""Online serving over REST: the same bundle, micro-batched, checked, measured.

``create_app(bundle_or_url)`` builds a Starlette (ASGI) application;
``serve(bundle_url)`` runs it under uvicorn and blocks. Endpoints:

* ``POST /predict``  a JSON list of records or a ``text/csv`` body with a header;
  the answer has the same format, one prediction per input row, in order
  (``?id=column`` copies that column into each answer row);
* ``GET /health``    liveness and readiness (200 once the model is loaded, 503 before);
* ``GET /info``      versions, input schema, features, outputs, training summary;
* ``POST /jobs``, ``GET /jobs/{id}``  ``predict_files`` on the Dask cluster, in the background;
* ``GET /openapi.json``, ``GET /metrics`` (Prometheus text format);
* the standard protocols (:mod:`daskml_scale.serving.protocols`): the Open Inference
  Protocol v2 (``/v2/...``), TensorFlow Serving's REST API (``/v1/models/...``) and
  MLflow's scoring server (``/ping``, ``/version``, ``/invocations``);
* several models by name, and new versions swapped in without losing a request
  (:mod:`daskml_scale.serving.models`).

Concurrent requests are coalesced into one model call (``serve.max-batch-rows``,
``serve.max-wait-ms`` in :mod:`daskml_scale.config`), which runs in one thread off
the event loop. This module imports Starlette only when an app is built, so
``import daskml_scale`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from daskml_scale.serving.options import ServeOptions

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from distributed import Client
    from starlette.applications import Starlette

    from daskml_scale.bundle import Bundle

__all__ = ["create_app", "serve", "ServeOptions"]


def create_app(
    bundle_or_url: "Bundle | str | Mapping[str, Bundle | str]",
    *,
    client: "Client | None" = None,
    scheduler: str | None = None,
    storage_options: dict[str, Any] | None = None,
    max_batch_rows: int | None = None,
    max_wait_ms: float | None = None,
    micro_batching: bool = True,
    numpy_forward: bool | None = None,
    max_body_bytes: int | None = None,
    max_queue_rows: int | None = None,
    id_column: str | None = None,
    transform: "Callable[[pd.DataFrame], pd.DataFrame] | None" = None,
    safe_mode: bool = True,
    warmup: bool = True,
    freeze_gc: bool = False,
    on_dropped: str | None = None,
    model_name: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
    jobs_allow_read: "Sequence[str] | None" = None,
    jobs_allow_write: "Sequence[str] | None" = None,
) -> "Starlette":
    """An ASGI application serving a bundle.

    Parameters
    ----------
    bundle_or_url : Bundle, str or mapping
        A loaded :class:`~daskml_scale.bundle.Bundle`, or the URL of a bundle file
        (loaded in the background when the app starts; ``/health`` answers 503
        ``"loading"`` until it is ready). Several models: a mapping
        ``{name: bundle or URL}``, or the URL of a folder of ``*.bundle`` files (each
        served under its file's name); every protocol routes by name
        (``/models/NAME/predict``, ``/v2/models/NAME/infer``, ``/v1/models/NAME:predict``)
        and the first is also served at ``/predict`` (see :mod:`daskml_scale.serving.models`).
    client : distributed.Client, optional
        The Dask cluster that runs ``POST /jobs``.
    scheduler : str, optional
        A scheduler address for ``POST /jobs`` (connected on the first job), when no
        ``client`` is given. Without either, ``POST /jobs`` answers 503.
    storage_options : dict, optional
        fsspec options for the bundle URL and for the jobs' input and output URLs.
    max_batch_rows, max_wait_ms : optional
        Micro-batching limits; default ``serve.max-batch-rows`` and ``serve.max-wait-ms``.
    micro_batching : bool
        ``False``: one model call per request (the baseline).
    numpy_forward : bool, optional
        A small ``keras.Sequential`` of ``Dense`` layers answers through its NumPy form,
        equal to the backend's to float32 rounding and ~0.25 ms faster a batch
        (:mod:`daskml_scale.serving.forward`); ``False``: always the Keras backend.
        Default ``serve.numpy-forward`` (on).
    max_body_bytes : int, optional
        Larger bodies are refused with 413; default ``serve.max-body-bytes``.
    max_queue_rows : int, optional
        Most rows waiting for the model; beyond, requests get 503 with ``Retry-After``
        at once instead of waiting; default ``serve.max-queue-rows`` (0: unbounded).
    id_column : str, optional
        A field copied from each input row to its prediction (``?id=`` overrides it);
        default ``serve.id-column`` (none).
    transform : callable, optional
        The preprocessor's transform when the bundle cannot import it by name.
    safe_mode : bool
        Keras safe loading (refuse models that hold Python code).
    warmup : bool
        Run one prediction on a made-up row after loading, so the first request
        does not pay for tracing the model.
    freeze_gc : bool
        After loading, move every object alive to the garbage collector's permanent
        generation (``gc.freeze()``), so full collections no longer walk the
        TensorFlow objects and stall requests, and collect the youngest generation
        after 10,000 new objects instead of 700 (requests in flight are not walked
        over and over). Process-wide: meant for a process that only serves
        (``serve()`` turns it on).
    on_dropped : {"keep", "omit", "error"}, optional
        Rows the preprocessor's transform drops (``predict.on-dropped``, default
        ``"keep"``): ``"keep"`` answers each with ``null`` predictions,
        ``"dropped": true`` and ``"reason"`` (CSV: empty cells and a ``dropped``
        column); ``"omit"`` leaves them out of the answer (match rows with ``?id=``);
        ``"error"`` refuses the request with 422. Also the default of ``POST /jobs``.
    model_name : str, optional
        The name of the model on the protocol endpoints (``/v2/models/NAME/infer``,
        ``/v1/models/NAME:predict``); default: the bundle file's name without
        ``.bundle`` (``model`` for a loaded bundle).
    token, token_file : str, optional
        The bearer token (or a file holding it) every request but the health checks must
        carry; default ``$DASKML_SCALE_SERVE_TOKEN``, else ``serve.token-file``, else none
        (an open server; ``POST /jobs`` off). See :mod:`daskml_scale.serving.auth`.
    jobs_allow_read, jobs_allow_write : sequence of str, optional
        URL prefixes ``POST /jobs`` may read from and write to (``serve.jobs.allow-read``,
        ``serve.jobs.allow-write``); jobs are off unless both are set and a token is.

    Returns
    -------
    starlette.applications.Starlette
        Run it with any ASGI server; ``app.state.serving`` holds its state.

    Examples
    --------
    >>> app = create_app("s3://models/price.bundle", scheduler="tcp://scheduler:8786")  # doctest: +SKIP
    >>> # uvicorn module:app --host 0.0.0.0 --port 8000
    """
    from daskml_scale.serving import app

    options = ServeOptions.from_config(
        scheduler=scheduler, storage_options=storage_options, max_batch_rows=max_batch_rows,
        max_wait_ms=max_wait_ms, micro_batching=micro_batching, numpy_forward=numpy_forward,
        max_body_bytes=max_body_bytes,
        max_queue_rows=max_queue_rows,
        id_column=id_column, transform=transform, safe_mode=safe_mode, warmup=warmup, freeze_gc=freeze_gc,
        on_dropped=on_dropped, model_name=model_name, token=token, token_file=token_file,
        jobs_allow_read=jobs_allow_read, jobs_allow_write=jobs_allow_write,
    )
    return app.create_app(bundle_or_url, options, client=client)


def serve(
    bundle_url: "str | Bundle | Mapping[str, Bundle | str]",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    scheduler: str | None = None,
    storage_options: dict[str, Any] | None = None,
    max_batch_rows: int | None = None,
    max_wait_ms: float | None = None,
    micro_batching: bool = True,
    numpy_forward: bool | None = None,
    max_body_bytes: int | None = None,
    max_queue_rows: int | None = None,
    id_column: str | None = None,
    transform: "Callable[[pd.DataFrame], pd.DataFrame] | None" = None,
    safe_mode: bool = True,
    tf_threads: int | None = None,
    log_level: str = "warning",
    access_log: bool = False,
    freeze_gc: bool = True,
    on_dropped: str | None = None,
    model_name: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
    jobs_allow_read: "Sequence[str] | None" = None,
    jobs_allow_write: "Sequence[str] | None" = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Serve a bundle over HTTP with uvicorn; blocks until the server stops.

    Parameters
    ----------
    bundle_url : str, Bundle or mapping
        The bundle file's URL (or a loaded bundle); several models as in :func:`create_app`.
    host, port : str, int
        Where to listen (loopback by default).
    scheduler : str, optional
        Dask scheduler address for ``POST /jobs``.
    tf_threads : int, optional
        TensorFlow intra-op threads in this process (set before the model loads).
    log_level, access_log :
        uvicorn's logging; the access log costs throughput and is off by default.
    freeze_gc : bool
        See :func:`create_app`; on by default here.
    ssl_certfile, ssl_keyfile : str, optional
        A PEM certificate (chain) and its private key: serve HTTPS (passed to uvicorn).
    **others :
        As in :func:`create_app`.

    Raises
    ------
    ImportError
        uvicorn or starlette is not installed (``pip install 'daskml_scale[serve]'``).

    Examples
    --------
    >>> import daskml_scale
    >>> daskml_scale.serve("models/price.bundle", port=8000)  # doctest: +SKIP
    """
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("serve() needs uvicorn and starlette: pip install 'daskml_scale[serve]'") from exc
    options = ServeOptions.from_config(
        scheduler=scheduler, storage_options=storage_options, max_batch_rows=max_batch_rows,
        max_wait_ms=max_wait_ms, micro_batching=micro_batching, numpy_forward=numpy_forward,
        max_body_bytes=max_body_bytes,
        max_queue_rows=max_queue_rows,
        id_column=id_column, transform=transform, safe_mode=safe_mode, freeze_gc=freeze_gc, on_dropped=on_dropped,
        model_name=model_name, token=token, token_file=token_file, jobs_allow_read=jobs_allow_read,
        jobs_allow_write=jobs_allow_write,
    )
    if tf_threads is not None:
        _set_tf_threads(int(tf_threads))
    from daskml_scale.serving import app

    application = app.create_app(bundle_url, options)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        from daskml_scale.exceptions import ArgumentError

        raise ArgumentError(f"HTTPS needs both ssl_certfile and ssl_keyfile. Received: ssl_certfile={ssl_certfile!r}, "
                            f"ssl_keyfile={ssl_keyfile!r}")
    uvicorn.run(
        application, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
        ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
    )


def _set_tf_threads(n: int) -> None:
    """Both of the Keras backend's thread pools get ``n`` threads (the server's own process)."""
    from daskml_scale import backend

    backend.current().configure_threads(n, inter_op=n)
