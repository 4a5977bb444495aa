"""Batch jobs submitted over REST: ``predict_files`` run on the Dask cluster.

A job runs in a background thread of the server (``predict_files`` blocks while
the cluster works); its state and report are kept in memory, newest
``max_jobs`` only.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from daskml_scale._utils.jsonable import jsonable
from daskml_scale.dropped_rows import ON_DROPPED
from daskml_scale.io.writers import FORMATS as _FORMATS
from daskml_scale.serving.auth import ForbiddenError, check_url
from daskml_scale.serving.errors import NotFoundError, RequestError, ServiceUnavailableError
from daskml_scale.serving.metrics import Registry

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from daskml_scale.bundle import Bundle

__all__ = ["JobManager"]

_KEYS = {"input", "output", "format", "keep", "overwrite", "on_bad_rows", "on_dropped"}


class JobManager:
    """Submit, run and describe batch prediction jobs.

    Parameters
    ----------
    client : distributed.Client, optional
        The cluster to run on.
    scheduler : str, optional
        A scheduler address to connect to on the first job (when no ``client``).
    storage_options : dict, optional
        fsspec options for the job's input and output URLs.
    max_jobs : int
        How many finished jobs to remember.
    on_dropped : str, optional
        The jobs' ``on_dropped`` when a request does not say (``predict_files``' default).
    allow_read, allow_write : sequence of str
        The URL prefixes jobs may read from and write to; jobs are off unless both are
        given and ``locked``.
    locked : bool
        The server asks every request for a bearer token (jobs are off otherwise).
    """

    def __init__(
        self,
        *,
        client: "Client | None" = None,
        scheduler: str | None = None,
        storage_options: dict[str, Any] | None = None,
        max_jobs: int = 1000,
        metrics: Registry | None = None,
        on_dropped: str | None = None,
        allow_read: tuple[str, ...] = (),
        allow_write: tuple[str, ...] = (),
        locked: bool = False,
    ) -> None:
        self._client = client
        self.allow_read, self.allow_write, self.locked = tuple(allow_read), tuple(allow_write), locked
        self.on_dropped = on_dropped
        self._own_client: "Client | None" = None
        self.scheduler = scheduler
        self.storage_options = storage_options
        self.max_jobs = max_jobs
        self.metrics = metrics or Registry()
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="daskml-serve-job")

    @property
    def configured(self) -> bool:
        """A cluster to run jobs on is known."""
        return self._client is not None or self.scheduler is not None

    @property
    def enabled(self) -> bool:
        """Jobs are on: a cluster, a token, and URL prefixes to read from and write to."""
        return self.configured and self.locked and bool(self.allow_read) and bool(self.allow_write)

    def check_access(self, spec: dict[str, Any]) -> None:
        """403 unless jobs are on and the request's URLs fall under the allowed prefixes."""
        if not self.enabled:
            missing = [what for what, ok in (("a bearer token (--token-file or $DASKML_SCALE_SERVE_TOKEN)", self.locked),
                                             ("serve.jobs.allow-read", bool(self.allow_read)),
                                             ("serve.jobs.allow-write", bool(self.allow_write))) if not ok]
            raise ForbiddenError(f"Batch jobs are off on this server: they read and write URLs, so they need {missing}")
        check_url(spec["input"], self.allow_read, "input")
        check_url(spec["output"], self.allow_write, "output")

    def _get_client(self) -> "Client":
        if self._client is not None:
            return self._client
        with self._lock:
            if self._own_client is None:
                from distributed import Client

                self._own_client = Client(self.scheduler, set_as_default=False, timeout="30s")
            return self._own_client

    # -- requests -------------------------------------------------------------------
    @staticmethod
    def parse_request(spec: Any) -> dict[str, Any]:
        """Check a job request.

        ``{"input": URL, "output": URL, "format"?: "csv"|"parquet", "keep"?: ...,
        "overwrite"?: bool, "on_bad_rows"?: "error"|"skip", "on_dropped"?: "keep"|"omit"|"error"}``,
        as in ``predict_files``.
        """
        if not isinstance(spec, dict):
            raise RequestError(400, f"Expected a JSON object {{'input': URL, 'output': URL}}. Received: {type(spec).__name__}")
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise RequestError(422, f"Unknown job fields {unknown}; expected some of {sorted(_KEYS)}", field=unknown[0])
        for key in ("input", "output"):
            v = spec.get(key)
            if not isinstance(v, str) or not v:
                raise RequestError(422, f"Job field {key!r}: expected a URL string. Received: {v!r}", field=key)
        fmt = spec.get("format", "csv")
        if fmt not in _FORMATS:
            raise RequestError(422, f"Job field 'format': expected one of {list(_FORMATS)}. Received: {fmt!r}", field="format")
        keep = spec.get("keep")
        if keep is not None and not isinstance(keep, str) and (
            not isinstance(keep, list) or not all(isinstance(k, str) for k in keep)
        ):
            raise RequestError(
                422, f"Job field 'keep': expected \"all\", a column name or a list of them. Received: {keep!r}",
                field="keep",
            )
        overwrite = spec.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise RequestError(422, f"Job field 'overwrite': expected true or false. Received: {overwrite!r}", field="overwrite")
        on_bad_rows = spec.get("on_bad_rows")
        if on_bad_rows not in (None, "error", "skip"):
            raise RequestError(
                422, f"Job field 'on_bad_rows': expected \"error\" or \"skip\". Received: {on_bad_rows!r}",
                field="on_bad_rows",
            )
        on_dropped = spec.get("on_dropped")
        if on_dropped not in (None, *ON_DROPPED):
            raise RequestError(
                422, f"Job field 'on_dropped': expected one of {list(ON_DROPPED)}. Received: {on_dropped!r}",
                field="on_dropped",
            )
        return {
            "input": spec["input"], "output": spec["output"], "format": fmt, "keep": keep,
            "overwrite": overwrite, "on_bad_rows": on_bad_rows, "on_dropped": on_dropped,
        }

    def submit(self, bundle: "Bundle", spec: dict[str, Any]) -> dict[str, Any]:
        """Start a job in the background; returns its description (state ``queued``)."""
        if not self.configured:
            raise ServiceUnavailableError(
                "This server has no Dask cluster for batch jobs: start it with scheduler=ADDRESS "
                "(daskml-scale serve BUNDLE --scheduler ADDRESS) or create_app(..., client=client)",
            )
        self.check_access(spec)
        job_id = uuid.uuid4().hex
        job = {
            "id": job_id, "state": "queued", "request": spec, "submitted": time.time(),
            "started": None, "finished": None, "report": None, "error": None,
        }
        with self._lock:
            self._jobs[job_id] = job
            while len(self._jobs) > self.max_jobs:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest]["state"] in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)
        self._executor.submit(self._run, job, bundle)
        return self.describe(job_id)

    def describe(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"No job with id {job_id!r} (jobs are kept in memory, newest {self.max_jobs})")
            return jsonable(dict(job))  # a copy: the job thread goes on writing to the job

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"id": j["id"], "state": j["state"], "submitted": j["submitted"]} for j in self._jobs.values()]

    # -- in a job thread --------------------------------------------------------------------
    def _run(self, job: dict[str, Any], bundle: "Bundle") -> None:
        from daskml_scale.predict import predict_files

        job["state"], job["started"] = "running", time.time()
        spec = job["request"]
        try:
            client = self._get_client()
            # as_current: predict_files' as_completed() looks up the default client
            with client.as_current():
                report = predict_files(
                    bundle, spec["input"], spec["output"], format=spec["format"], keep=spec["keep"],
                    overwrite=spec["overwrite"], on_bad_rows=spec["on_bad_rows"],
                    on_dropped=spec.get("on_dropped") or self.on_dropped,
                    storage_options=self.storage_options, client=client,
                )
        except Exception as exc:  # the job fails, the server goes on
            job["error"] = f"{type(exc).__name__}: {exc}"
            job["traceback"] = traceback.format_exc(limit=5)
            job["state"] = "failed"
        else:
            job["report"] = jsonable(dataclasses.asdict(report))
            failed = getattr(report, "failed", None)
            job["state"] = "failed" if failed else "done"
        job["finished"] = time.time()
        self.metrics.jobs.inc(1, job["state"])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._own_client is not None:
            try:
                self._own_client.close()
            except Exception:  # pragma: no cover - closing a lost connection
                pass
            self._own_client = None
