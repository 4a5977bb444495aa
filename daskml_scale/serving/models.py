"""Several models in one server: by name, each with its own bundle, micro-batcher,
model thread and metrics, and a new version swapped in without losing a request.

``create_app`` takes one bundle (served under its file's name), a mapping
``{name: bundle or URL}``, or the URL of a folder of ``*.bundle`` files (each served
under its file's name). Every protocol routes by that name (``/models/{name}/predict``,
``/v2/models/{name}/infer``, ``/v1/models/{name}:predict``); the first model is also
the one ``/predict``, ``/info``, ``/metrics`` and ``/invocations`` serve.

A reload (``POST /v2/repository/models/{name}/load``, or SIGHUP for every model with a
URL: one given as a URL, or a bundle :func:`~daskml_scale.bundle.load_bundle` read from
one, as ``daskml-scale serve`` passes them) loads the new version in a state of its own, next to the old one that goes on
serving; only once the new one is ready does it take the name. Requests that had
already reached the old version finish there; the old version is stopped once it is
idle. A version that fails to load changes nothing but ``last_error``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import posixpath
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from daskml_scale.exceptions import ArgumentError
from daskml_scale.serving.errors import NotFoundError, RequestError
from daskml_scale.serving.metrics import Registry
from daskml_scale.serving.options import ServeOptions

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Receive, Scope, Send

    from daskml_scale.bundle import Bundle
    from daskml_scale.serving.app import ServingState

__all__ = ["Served", "ModelSet", "Named", "sources_of", "name_of_url", "list_models"]

logger = logging.getLogger("daskml_scale.serving")

#: how long an old version may take to finish the requests it holds before it is stopped anyway
DRAIN_TIMEOUT_S = 120.0


def name_of_url(url: str) -> str:
    """A model name from a bundle's URL: the file's name without ``.bundle``."""
    base = posixpath.basename(url.rstrip("/"))
    return base.removesuffix(".bundle") or "model"


def sources_of(
    bundle_or_url: "Bundle | str | Mapping[str, Bundle | str]", model_name: str | None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, "Bundle | str"]:
    """Name -> bundle or URL: a mapping as given; a folder URL: its ``*.bundle`` files;
    one bundle or URL: under ``model_name``, else its file's name (``model`` for an object
    made from bytes)."""
    if isinstance(bundle_or_url, Mapping):
        if not bundle_or_url:
            raise ArgumentError("Expected at least one model to serve. Received: an empty mapping")
        return dict(bundle_or_url)
    if isinstance(bundle_or_url, str):
        import fsspec

        fs, path = fsspec.core.url_to_fs(bundle_or_url, **(storage_options or {}))
        if fs.isdir(path):
            files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".bundle"))
            if not files:
                raise FileNotFoundError(f"{bundle_or_url}: a folder without *.bundle files; expected a bundle file "
                                        "or a folder of them")
            proto = bundle_or_url.split("://", 1)[0] + "://" if "://" in bundle_or_url else ""
            return {name_of_url(f): (f if not proto or f.startswith(proto) else proto + f) for f in files}
        return {model_name or name_of_url(bundle_or_url): bundle_or_url}
    source = bundle_or_url.source
    return {model_name or (name_of_url(source) if source is not None else "model"): bundle_or_url}


@dataclass
class Served:
    """One name: the version that answers now."""

    name: str
    state: "ServingState"
    version: int = 1
    #: the last reload's error (the version above still serves), or None
    last_error: str | None = None
    loaded_at: float = dataclasses.field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        s = self.state
        return {
            "name": self.name, "version": str(self.version),
            "state": "READY" if s.ready.is_set() else ("UNAVAILABLE" if s.load_error else "LOADING"),
            "reason": s.load_error or self.last_error or "", "url": s.url,
            "content_hash": s.bundle.content_hash if s.ready.is_set() and s.bundle is not None else None,
        }


StateFactory = Callable[["Bundle | str", ServeOptions, Registry], "ServingState"]


class ModelSet:
    """The served models by name.

    Parameters
    ----------
    sources : mapping
        Name -> bundle or URL.
    options : ServeOptions
        Every model's settings (``model_name`` set to its name).
    make_state : callable
        ``make_state(bundle_or_url, options, metrics) -> ServingState``.
    """

    def __init__(self, sources: Mapping[str, "Bundle | str"], options: ServeOptions, make_state: StateFactory) -> None:
        self.options = options
        self.make_state = make_state
        self.served: dict[str, Served] = {}
        for name, src in sources.items():
            self.served[name] = Served(name, make_state(src, self._options(name), Registry()))
        self.default = next(iter(self.served))
        #: called with the new default state when the default model is replaced
        self.on_default: Callable[["ServingState"], None] | None = None
        self._loading: dict[str, asyncio.Task] = {}
        self._draining: set[asyncio.Task] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def _options(self, name: str) -> ServeOptions:
        return dataclasses.replace(self.options, model_name=name)

    # -- lookups ---------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.served)

    def get(self, name: str, version: str | None = None) -> Served:
        """The model ``name`` (at ``version``, when given), or 404 naming those served."""
        served = self.served.get(name)
        if served is None:
            raise NotFoundError(f"No model named {name!r} is served here; this server serves {self.names()}")
        if version is not None and version != str(served.version):
            raise NotFoundError(f"Model {name!r} has no version {version!r}; it serves version {served.version}")
        return served

    def resolve(self, scope: "Scope") -> Served:
        """The model a request names in its path (``{name}``, ``{version}``), else the default."""
        p = scope.get("path_params") or {}
        name = p.get("name")
        return self.served[self.default] if name is None else self.get(name, p.get("version"))

    def registry_for(self, scope: "Scope") -> Registry:
        """The metrics of the model a request was for (the default's when it names none or an unknown one)."""
        name = (scope.get("path_params") or {}).get("name")
        served = self.served.get(name) if name is not None else None
        return (served or self.served[self.default]).state.metrics

    # -- lifecycle -------------------------------------------------------------
    @staticmethod
    async def _start(state: "ServingState") -> asyncio.Task:
        state.batcher.start()
        state.features.start()
        return asyncio.get_running_loop().create_task(state.batcher.run_in_model_thread(state.load))

    @staticmethod
    async def _stop(state: "ServingState") -> None:
        await state.features.stop()
        await state.batcher.stop()
        state.jobs.close()

    async def start(self) -> None:
        """Start every model; each loads in its own model thread, in the background."""
        for s in self.served.values():
            self._loading[s.name] = await self._start(s.state)

    async def stop(self) -> None:
        for t in self._loading.values():
            if not t.done():
                t.cancel()
        for t in list(self._draining):
            t.cancel()
        for s in self.served.values():
            await self._stop(s.state)

    async def load(self, name: str, url: str | None = None) -> Served:
        """Load a new version of ``name`` (from ``url``, else its current URL) and swap it in
        once ready; a new ``name`` with a ``url`` adds a model.

        Raises
        ------
        RequestError
            400: no URL to load from; 422: the new version failed to load (the old one
            goes on serving, and ``last_error`` says why).
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # one reload of a name at a time
            old = self.served.get(name)
            src = url or (old.state.url if old is not None else None)
            if src is None:
                raise (NotFoundError(f"No model named {name!r} is served here; give a URL to load it from "
                                     "({\"parameters\": {\"url\": ...}})") if old is None else
                       RequestError(400, f"Model {name!r} was given as an object, not a URL: give the URL of its new "
                                    "version ({\"parameters\": {\"url\": ...}})"))
            metrics = old.state.metrics if old is not None else Registry()
            new = self.make_state(src, self._options(name), metrics)
            await (await self._start(new))  # wait-bounded: a load in this process; its errors become load_error
            if not new.ready.is_set():
                await self._stop(new)
                error = new.load_error or "the load was cancelled"
                if old is not None:
                    old.last_error = error
                logger.error("daskml_scale serve: model %r: the new version failed to load (%s); the old one goes on "
                             "serving", name, error)
                raise RequestError(422, f"Model {name!r}: the new version from {src} failed to load: {error}"
                                   + ("; the previous version goes on serving" if old is not None else ""))
            served = Served(name, new, version=old.version + 1 if old is not None else 1)
            self.served[name] = served
            if name == self.default and self.on_default is not None:
                self.on_default(new)
            if old is not None:
                task = asyncio.get_running_loop().create_task(self._drain(old.state))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            return served

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (not the default model) once its requests are done."""
        served = self.get(name)
        if name == self.default:
            raise RequestError(400, f"Model {name!r} is the default model (/predict); it cannot be unloaded")
        del self.served[name]
        await self._drain(served.state)

    async def _drain(self, state: "ServingState") -> None:
        """Stop an old version once no request holds it (or after ``DRAIN_TIMEOUT_S``)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not (state.batcher.idle and state.features.batcher.idle) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._stop(state)

    def install_sighup(self) -> bool:
        """Reload every model on SIGHUP (the main thread's event loop only); True if installed."""
        if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
            return False
        loop = asyncio.get_running_loop()

        def on_hup() -> None:
            task = loop.create_task(self.reload_all())
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

        try:
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover - loops without signals
            return False
        return True

    @staticmethod
    def remove_sighup(installed: bool) -> None:
        if installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    async def reload_all(self) -> None:
        """Reload every model that has a URL (SIGHUP); a failure is logged, the old version stays."""
        for name in list(self.served):
            if self.served[name].state.url is not None:
                try:
                    await self.load(name)
                except RequestError as exc:
                    logger.error("daskml_scale serve: reload of %r failed: %s", name, exc)


async def list_models(request: Any) -> Any:
    """``GET /models``: every model, its version, state, URL, content hash and last reload error."""
    from starlette.responses import Response

    from daskml_scale.serving.inputs import dumps

    models: ModelSet = request.app.state.models
    return Response(dumps({"default": models.default, "models": [s.describe() for s in models.served.values()]}),
                    media_type="application/json")


class Named:
    """An endpoint under ``/models/{name}/...``: 404 for a name not served, else the endpoint."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        from daskml_scale.serving.inputs import dumps

        try:
            scope["app"].state.models.get(scope["path_params"]["name"])
        except NotFoundError as err:
            body = dumps(err.to_dict())
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
