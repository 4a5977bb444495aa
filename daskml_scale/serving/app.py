"""The Starlette application: routes, readiness, metrics middleware, OpenAPI.

Everything heavy lives elsewhere: parsing and checks in ``inputs``, coalescing in
``batcher``, batch jobs in ``jobs``; the handlers only translate HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from urllib.parse import parse_qs
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daskml_scale._version import __version__
from daskml_scale.dropped_rows import apply_on_dropped
from daskml_scale.exceptions import DataError
from daskml_scale.serving.auth import AuthMiddleware
from daskml_scale.serving.batcher import Block, Columns, MicroBatcher
from daskml_scale.serving.collector import tune_collector
from daskml_scale.serving.errors import RequestError, ServingError
from daskml_scale.serving.fastpath import FastPath, fast_path_for
from daskml_scale.serving.http import receive_body as _receive_body
from daskml_scale.serving.http import require_ready as _require_ready
from daskml_scale.serving.inputs import DROPPED_COLUMN, InputSpec, dumps, loads, output_csv, output_records
from daskml_scale.serving.jobs import JobManager
from daskml_scale.serving.metrics import CONTENT_TYPE, Registry
from daskml_scale.serving.models import ModelSet, Named, list_models, sources_of
from daskml_scale.serving.openapi import openapi_document
from daskml_scale.serving.options import ServeOptions
from daskml_scale.serving.protocols import routes as protocol_routes
from daskml_scale.serving.protocols.common import FeatureModel

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from daskml_scale.bundle import Bundle

__all__ = ["create_app", "ServingState"]

logger = logging.getLogger("daskml_scale.serving")

_ENDPOINTS = ("/predict", "/health", "/info", "/metrics", "/openapi.json", "/jobs")


class _Json(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _problem(err: ServingError) -> Response:
    return _Json(err.to_dict(), status_code=err.status)


# ---------------------------------------------------------------------------- state
class ServingState:
    """The loaded bundle, the batcher and the job manager of one app.

    Parameters
    ----------
    bundle_or_url : Bundle or str
        The bundle, or its URL (loaded by :meth:`load`); a new version is read from the
        URL, or from the bundle's ``source``.
    options : ServeOptions
        The app's settings.
    client : distributed.Client, optional
        The cluster for ``POST /jobs``.
    metrics : Registry, optional
        The model's metrics (a new version of a model keeps those of the old one).
    """

    def __init__(
        self, bundle_or_url: "Bundle | str", options: ServeOptions, *, client: "Client | None" = None,
        metrics: Registry | None = None,
    ) -> None:
        # a bundle loaded from a URL keeps it: a reload (SIGHUP, the repository endpoint) reads it again
        self.url = bundle_or_url if isinstance(bundle_or_url, str) else bundle_or_url.source
        self.bundle: "Bundle | None" = None if isinstance(bundle_or_url, str) else bundle_or_url
        self.options = options
        self.max_body_bytes = options.max_body_bytes
        self.id_column = options.id_column
        self.metrics = metrics or Registry()
        self.spec: InputSpec | None = None
        self.preprocessor: Any = None
        #: the NumPy path of a plain bundle (:mod:`daskml_scale.serving.fastpath`), set by ``load``
        self.fast: FastPath | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.batcher = MicroBatcher(
            self._predict, self._build_frame, max_batch_rows=options.max_batch_rows,
            max_wait_ms=options.max_wait_ms, enabled=options.micro_batching, metrics=self.metrics,
            max_queue_rows=options.max_queue_rows, run=self._run,
        )
        #: the model alone, for rows already transformed (the protocols' feature tensors)
        self.features = FeatureModel(self)
        self.jobs = JobManager(
            client=client, scheduler=options.scheduler, storage_options=options.storage_options, metrics=self.metrics,
            on_dropped=options.on_dropped, allow_read=options.jobs_allow_read, allow_write=options.jobs_allow_write,
            locked=options.token is not None,
        )

    # -- loading (in the model thread) ------------------------------------------------
    def load(self) -> None:
        """Load the bundle and the model (in the model thread); ``ready`` is set once done."""
        o = self.options
        try:
            if self.bundle is None:
                from daskml_scale.bundle import load_bundle

                assert self.url is not None
                self.bundle = load_bundle(
                    self.url, storage_options=o.storage_options, safe_mode=o.safe_mode, transform=o.transform
                )
            b = self.bundle
            pre = b.preprocessor
            from daskml_scale.groups.bundle import GroupBundle  # one model per group: its key is required too

            groups = list(b.by) if isinstance(b, GroupBundle) else []
            self.spec = InputSpec(b.input_schema, [*pre.numeric, *pre.categorical, *groups], target=pre.target)
            self.preprocessor = pre
            b.model  # noqa: B018  (load the model now, not on the first request)
            self.fast = fast_path_for(b, self.spec, o.numpy_forward)
            if o.warmup:
                self._warm_up()
            if o.freeze_gc:
                tune_collector()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("daskml_scale serve: cannot load the bundle: %s", self.load_error)
            return
        self.ready.set()

    def _warm_up(self) -> None:
        """One prediction on a made-up row, so the first request does not pay the trace."""
        assert self.bundle is not None and self.spec is not None
        pre = self.bundle.preprocessor
        row: dict[str, Any] = {}
        for c in self.spec.columns:
            if not c.required:
                continue
            if c.name in pre.numeric:
                row[c.name] = float(pre.means_.get(c.name, 0.0))
            elif c.name in pre.categorical and pre.categories_.get(c.name):
                row[c.name] = pre.categories_[c.name][0]
            elif c.numeric:
                row[c.name] = 0.0
            else:
                row[c.name] = ""
        try:
            self._run([Block(self.spec.check_records([row]), 1)])  # the path requests take
        except Exception as exc:
            # a row with every required column, at the training means, that the bundle cannot
            # predict: requests would fail the same way, so the server says so now (/health)
            raise RuntimeError(f"the warm-up prediction on a made-up row failed: {type(exc).__name__}: {exc}") from exc

    # -- the model call (in the model thread) -------------------------------------------------
    def _run(self, blocks: Sequence[Block]) -> Columns:
        """A batch's answer columns: checked JSON columns of a bundle without a transform go
        straight to the model's features (:class:`FastPath`); the rest through a frame."""
        fast = self.fast
        if fast is not None and fast.direct and all(isinstance(b.rows, dict) for b in blocks):
            spec = self.spec
            assert spec is not None
            with _refusals():
                cols = fast.predict_columns(spec.concat_columns([(b.rows, b.n) for b in blocks]), sum(b.n for b in blocks))
            if cols is not None:
                return cols
        return self._predict_columns(self._build_frame(blocks))

    def _build_frame(self, blocks: Sequence[Block]) -> pd.DataFrame:
        spec = self.spec
        assert spec is not None
        if all(isinstance(b.rows, dict) for b in blocks):
            return spec.columns_to_frame(spec.concat_columns([(b.rows, b.n) for b in blocks]))  # type: ignore[misc]
        frames = [spec.columns_to_frame(b.rows) if isinstance(b.rows, dict) else b.rows for b in blocks]
        return spec.frames_to_frame(frames)  # type: ignore[arg-type]

    def _predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """:meth:`_predict_columns` as a frame (one column per output, ``frame``'s length)."""
        return pd.DataFrame(self._predict_columns(frame))

    def _predict_columns(self, frame: pd.DataFrame) -> Columns:
        """``Bundle.predict_frame``, except that the target is never encoded, as answer columns.

        The client may send the raw columns the transform derives the target from
        (e.g. a price that becomes ``log_price``), for some rows only; prediction
        has no use for the target, so it is dropped after the user's transform.

        One output row per input row: where the transform dropped rows, empty
        outputs and a :data:`DROPPED_COLUMN` that marks them (the answer then says
        so, or leaves them out: ``on_dropped``); under ``on_dropped="error"`` a 422.
        """
        b = self.bundle
        assert b is not None
        fast = self.fast
        with _refusals():
            if fast is not None:  # the features from NumPy arrays, the answer from the outputs
                raw, rows = fast.predict_kept(frame)
                if rows is None:
                    return fast.answer(raw, len(frame))
                pred = b.outputs_to_frame(raw, frame.index[rows])
            else:
                pred, rows = b.predict_kept(frame, batch_size=max(len(frame), 1))
                if rows is None:
                    return _frame_columns(pred)
            if self.options.on_dropped == "error":
                first = int(np.setdiff1d(np.arange(len(frame)), rows)[0])
                raise RequestError(
                    422, f"The model's transform dropped {len(frame) - len(rows)} of the {len(frame)} rows, the first "
                    f"record {first}; this server refuses such requests (on_dropped='error'). Send rows the transform "
                    "keeps, or serve with on_dropped='keep' (null predictions) or 'omit'."
                )
            _, out = apply_on_dropped(frame, pred, rows, "keep")
            dropped = np.ones(len(frame), dtype=bool)
            dropped[rows] = False
            out[DROPPED_COLUMN] = dropped
            return _frame_columns(out)


def _frame_columns(frame: pd.DataFrame) -> Columns:
    """Output column -> values: one conversion per batch (requests then take list slices)."""
    return {str(c): frame[c].tolist() for c in frame.columns}


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Errors of the model call that are the client's fault, as 422s."""
    try:
        yield
    except ServingError:
        raise
    except DataError as exc:  # a value the preprocessor refuses: the client's fault
        raise RequestError(422, f"The model's preprocessor refused the input: {exc}", field=exc.column) from exc
    except (KeyError, TypeError, ValueError) as exc:  # the user's transform on bad input
        raise RequestError(422, f"The model's transform failed on this input: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- handlers
async def _read_body(request: Request, limit: int) -> bytes:
    """The body of a Starlette request, under the size limit (see :func:`_receive_body`)."""
    return await _receive_body(request.receive, request.headers.get("content-length"), limit)


def _state(request: Request) -> ServingState:
    """The model a request names (``/models/{name}/...``), else the default model."""
    return request.app.state.models.resolve(request.scope).state


class PredictEndpoint:
    """``POST /predict`` as a plain ASGI app: the hot path, without Request/Response objects.

    Reads the body (refusing it past the size limit), checks it against the
    bundle's input spec, hands the rows to the micro-batcher and answers in the
    request's format. Every refusal is a JSON ``{"error": ..., "status": ...}``.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            state: ServingState = scope["app"].state.models.resolve(scope).state
            status, ctype, body = await self._handle(state, scope, receive)
        except ServingError as err:
            status, ctype, body = err.status, b"application/json", dumps(err.to_dict())
            extra = err.headers()  # Retry-After on 503 overloaded
        else:
            extra = []
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra],
        })
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, state: ServingState, scope: Scope, receive: Receive) -> tuple[int, bytes, bytes]:
        _require_ready(state)
        spec = state.spec
        assert spec is not None
        ctype, length = "application/json", None
        for k, v in scope["headers"]:
            if k == b"content-type":
                ctype = v.decode("latin-1").split(";")[0].strip().lower()
            elif k == b"content-length":
                length = v
        id_column = state.id_column
        if scope.get("query_string"):
            id_column = parse_qs(scope["query_string"].decode("latin-1")).get("id", [id_column])[0]
        is_csv = ctype in ("text/csv", "application/csv")
        if not is_csv and not (ctype in ("application/json", "", "*/*") or ctype.endswith("+json")):
            raise RequestError(
                415, f"Unsupported Content-Type {ctype!r}: send application/json (a list of records) or text/csv"
            )
        batcher = state.batcher
        batcher.check_room()  # a full queue: 503 at once, before reading the body
        with batcher.arrival():
            body = await _receive_body(receive, length, state.max_body_bytes)
            if is_csv:
                rows, ids = spec.parse_csv(body, id_column)
                n = len(rows)
            else:
                rows, n, ids = spec.parse_json(body, id_column)
        cols = await batcher.submit(rows, n, receive)
        omit = state.options.on_dropped == "omit"
        if is_csv:
            return 200, b"text/csv; charset=utf-8", output_csv(cols, ids, id_column, omit_dropped=omit)
        return 200, b"application/json", dumps(output_records(cols, ids, id_column, omit_dropped=omit))


async def health(request: Request) -> Response:
    state = _state(request)
    ready = state.ready.is_set()
    body: dict[str, Any] = {
        "live": True,
        "ready": ready,
        "status": "ready" if ready else ("failed" if state.load_error else "loading"),
    }
    if state.load_error:
        body["error"] = state.load_error
    if ready and state.bundle is not None:
        body["content_hash"] = state.bundle.content_hash
    return _Json(body, status_code=200 if ready else 503)


async def info(request: Request) -> Response:
    state = _state(request)
    try:
        _require_ready(state)
    except ServingError as err:
        return _problem(err)
    assert state.bundle is not None
    body = state.bundle.info()
    b = state.batcher
    body["serving"] = {
        "micro_batching": b.enabled,
        "max_batch_rows": b.max_batch_rows,
        "max_wait_ms": b.max_wait * 1000.0,
        "max_body_bytes": state.max_body_bytes,
        "id_column": state.id_column,
        "on_dropped": state.options.on_dropped,
        "required_fields": state.spec.required if state.spec else None,
        "jobs": state.jobs.enabled,
        "token": state.options.token is not None,
        # how a batch reaches the model: "numpy" or "backend" (daskml_scale.serving.forward)
        "forward": getattr(getattr(state.fast, "forward", None), "kind", "backend"),
        # the process's garbage collector (tune_collector, with freeze_gc)
        "gc": {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()},
    }
    return _Json(body)


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


async def submit_job(request: Request) -> Response:
    state = _state(request)
    try:
        _require_ready(state)
        body = await _read_body(request, state.max_body_bytes)
        if not body.strip():
            raise RequestError(400, "The request body is empty: expected {\"input\": URL, \"output\": URL}")
        try:
            spec = loads(body)
        except (ValueError, TypeError) as exc:
            raise RequestError(400, f"Malformed JSON: {exc}") from None
        job = state.jobs.submit(state.bundle, state.jobs.parse_request(spec))  # type: ignore[arg-type]
    except ServingError as err:
        return _problem(err)
    return _Json(job, status_code=202, headers={"Location": f"/jobs/{job['id']}"})


async def get_job(request: Request) -> Response:
    try:
        return _Json(_state(request).jobs.describe(request.path_params["job_id"]))
    except ServingError as err:
        return _problem(err)


async def list_jobs(request: Request) -> Response:
    return _Json({"jobs": _state(request).jobs.list()})


async def openapi(request: Request) -> Response:
    state = _state(request)
    return _Json(openapi_document(
        record_schema=state.spec.json_schema() if state.spec is not None else None,
        output_names=state.bundle.output_names if state.bundle is not None else (),
        version=__version__,
    ))


# ------------------------------------------------------------------- metrics middleware
class MetricsMiddleware:
    """Count requests and errors and time them (plain ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp, registry_for: Callable[[Scope], Registry]) -> None:
        self.app = app
        self.registry_for = registry_for  # the metrics of the model a request was for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            endpoint = "/jobs/{id}" if path.startswith("/jobs/") else (path if path in _ENDPOINTS else _route(scope))
            r = self.registry_for(scope)
            r.requests.inc(1, endpoint, scope.get("method", ""), str(status))
            if status >= 400:
                r.errors.inc(1, endpoint, str(status))
            r.latency.observe(time.perf_counter() - t0)


def _route(scope: Scope) -> str:
    """The path template of the route that answered (``/v2/models/{name}/infer``), or ``other``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    prefixes = ("/v1/", "/v2", "/ping", "/version", "/invocations", "/models")
    return path if isinstance(path, str) and path.startswith(prefixes) else "other"


# ----------------------------------------------------------------------------- factory
_UNSEEN = object()  # a path not matched yet


class _Server(Starlette):
    """The application: Starlette, except that the inference endpoints (``POST /predict``
    and every protocol's predict/infer route), the hot path, go straight to their endpoint
    through the same metrics and token check, without Starlette's error and exception
    middleware and its walk over every route (~20-40 us of a ~150 us request). An error an
    endpoint does not answer itself reaches the ASGI server, which answers 500."""

    hot: ASGIApp | None = None
    hot_routes: Sequence[Route] = ()
    #: (the literal start of the route's path, the route), for each of ``hot_routes``
    hot_prefixes: Sequence[tuple[str, Route]] = ()
    #: (path, root path) of a POST -> (hot route, path parameters) or None (set per app)
    hot_matches: dict[tuple[str, Any], Any]

    #: how many request paths' matches are kept (then they start over)
    HOT_MATCHES = 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hot is not None and scope["type"] == "http" and scope["method"] == "POST":
            # a route's match depends on the path alone (and the method, POST here): kept by path,
            # it costs a dict lookup instead of a regex and its parameters' conversion (~1.5 us)
            key = (scope["path"], scope.get("root_path"))
            matches = self.hot_matches
            hit = matches.get(key, _UNSEEN)
            if hit is _UNSEEN:
                hit = self._match_hot(scope)
                if len(matches) >= self.HOT_MATCHES:
                    matches.clear()
                matches[key] = hit
            if hit is not None:
                route, params = hit
                scope["app"] = self
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = {**scope["path_params"], **params} if scope.get("path_params") else dict(params)
                await self.hot(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _match_hot(self, scope: Scope) -> "tuple[Route, dict[str, Any]] | None":
        """The hot route a POST's path matches, and the path's parameters; ``None``: no hot route."""
        path, root = scope["path"], scope.get("root_path")
        if root and path.startswith(root):  # the path below a proxy's prefix, as the routes see it
            path = path[len(root):]
        for prefix, route in self.hot_prefixes:
            if not path.startswith(prefix):  # a string test before the route's regex
                continue
            match, child = route.matches({**scope, "path_params": {}})
            if match is Match.FULL:
                return route, dict(child["path_params"])
        return None


async def _route_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The endpoint of the route a hot request matched (see :class:`_Server`)."""
    await scope["route"].app(scope, receive, send)


def create_app(
    bundle_or_url: "Bundle | str | Mapping[str, Bundle | str]", options: ServeOptions, *, client: "Client | None" = None,
) -> Starlette:
    """The application serving a bundle with these options.

    The public entry, with the options as keyword arguments and their defaults from
    :mod:`dask.config`, is :func:`daskml_scale.serving.create_app`.

    Parameters
    ----------
    bundle_or_url : Bundle, str or mapping
        The bundle, or its URL (loaded in the background when the app starts); a
        mapping ``{name: bundle or URL}``, or the URL of a folder of ``*.bundle`` files,
        for several models (:mod:`daskml_scale.serving.models`; the first is the default).
    options : ServeOptions
        The app's settings.
    client : distributed.Client, optional
        The cluster for ``POST /jobs``.

    Returns
    -------
    starlette.applications.Starlette
    """
    models = ModelSet(
        sources_of(bundle_or_url, options.model_name, options.storage_options), options,
        lambda src, opts, metrics: ServingState(src, opts, client=client, metrics=metrics),
    )
    state = models.served[models.default].state

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # each model loads in its own model thread, in the background: /health answers "loading" meanwhile
        await models.start()
        hup = models.install_sighup()
        try:
            yield
        finally:
            models.remove_sighup(hup)
            await models.stop()

    per_model = [
        Route("/models", list_models, methods=["GET"]),
        Route("/models/{name}/predict", Named(PredictEndpoint()), methods=["POST"]),
        *[Route(f"/models/{{name}}/{p}", Named(request_response(f)), methods=["GET"])
          for p, f in (("health", health), ("info", info), ("metrics", metrics))],
    ]
    app = _Server(
        middleware=[
            Middleware(MetricsMiddleware, registry_for=models.registry_for),
            *([Middleware(AuthMiddleware, token=options.token)] if options.token else []),
        ],
        routes=[
            Route("/predict", PredictEndpoint(), methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/jobs", submit_job, methods=["POST"]),
            Route("/jobs", list_jobs, methods=["GET"]),
            Route("/jobs/{job_id}", get_job, methods=["GET"]),
            *per_model,
            *protocol_routes(),
        ],
        lifespan=lifespan,
    )
    hot: ASGIApp = _route_app
    if options.token:
        hot = AuthMiddleware(hot, token=options.token)
    app.hot = MetricsMiddleware(hot, registry_for=models.registry_for)
    app.hot_routes = [r for r in app.routes if isinstance(r, Route) and r.methods == {"POST"}
                      and r.path.endswith(("/predict", "/infer", ":predict", "/invocations"))]
    app.hot_prefixes = [(r.path.split("{", 1)[0], r) for r in app.hot_routes]
    app.hot_matches = {}
    app.state.models = models
    models.on_default = lambda new: setattr(app.state, "serving", new)
    app.state.serving = state
    return app
