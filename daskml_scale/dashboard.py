"""A "daskml" page on the Dask dashboard: the running fit's curves, round, workers and traffic.

How it is put together, with distributed's own extension points:

* the fit's driver reports through the scheduler's **event log** (``Scheduler.log_event``,
  what ``Client.log_event`` calls): :class:`FitReporter`, a callback that ``fit`` adds,
  sends one event when the fit starts, at most a few per second while rounds end, one per
  epoch and one at the end, without waiting for an answer. The events live on the
  scheduler, so a fit driven from any client (a notebook, a script, the CLI) shows.
* the page and its data endpoint are **HTTP routes** of the scheduler's web server:
  ``/daskml`` (the page) and ``/daskml/data.json`` (the fits so far, built from the events).
  This module has ``routes`` in the shape of ``distributed.scheduler.http.routes`` modules,
  so a scheduler's config can list it; :class:`DaskmlDashboard`, a **scheduler plugin**
  that ``fit`` registers once per scheduler, adds the same routes to a scheduler already
  running.

Turn the reports off with ``dask.config.set({"daskml_scale.dashboard.enabled": False})``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.http.utils import RequestHandler

from daskml_scale import config
from daskml_scale.live import CallbackInterface

logger = logging.getLogger(__name__)

__all__ = ["DaskmlDashboard", "FitReporter", "fit_state", "dashboard_url", "routes", "INDEX_TOPIC"]

INDEX_TOPIC = "daskml-fits"  # one event per fit start and end
ROUND_EVERY_S = 0.25  # the most often a round's progress is reported


def fit_topic(fit_id: str, progress: bool = False) -> str:
    """The topic of a fit's start, epochs and end; with ``progress``, of its rounds. A topic
    keeps its last ``distributed.admin.low-level-log-length`` events (1,000 by default):
    rounds have their own, so that they never push the epochs out."""
    return f"daskml-fit-{fit_id}" + ("-progress" if progress else "")


def _clean(value: Any) -> Any:
    """JSON-able and msgpack-able: floats (NaN and inf to None), ints, str, lists, dicts."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, int):
        return int(value)
    return f if math.isfinite(f) else None


# ------------------------------------------------------------------------------ the driver's side
class FitReporter(CallbackInterface):
    """The fit's progress as scheduler events (what the daskml page shows).

    Added by :func:`daskml_scale.fit`; events are sent from the client's event loop, so a
    slow or gone scheduler never holds the training thread.
    """

    def __init__(self, client: Any, fit_id: str, describe: dict[str, Any]) -> None:
        super().__init__()
        self.client = client
        self.fit_id = fit_id
        self.describe = _clean(describe)
        self._t_epoch = 0.0
        self._t_round = 0.0
        self._t_last_round: float | None = None
        self._epoch = 0

    def _send(self, kind: str, **fields: Any) -> None:
        msg = _clean({"fit": self.fit_id, "kind": kind, "time": time.time(), **fields})
        if kind in ("round", "epoch_begin"):
            topics = [fit_topic(self.fit_id, progress=True)]
        else:
            topics = [fit_topic(self.fit_id)] + ([INDEX_TOPIC] if kind in ("start", "end") else [])
        try:
            if kind == "end":  # the last one is waited for (bounded): a script may close the cluster next
                self.client.sync(_log_event, self.client.scheduler, topics, msg, callback_timeout=5)
            else:
                self.client.loop.add_callback(_log_event, self.client.scheduler, topics, msg)
        except Exception:  # a closed client or a slow scheduler: the fit goes on without its page
            logger.debug("daskml_scale.fit: could not report to the dashboard", exc_info=True)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        info = self.params.get("daskml") or {}
        ensure_dashboard(self.client)
        self._send("start", epochs=self.params.get("epochs"), rounds=self.params.get("steps"),
                   fit_info=self.describe, workers=info.get("workers") or [],
                   stream_rows=info.get("stream_rows") or [])

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._t_epoch = time.perf_counter()
        self._t_last_round = None
        self._send("epoch_begin", epoch=epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.perf_counter()
        self._t_last_round = now
        if now - self._t_round >= ROUND_EVERY_S or batch + 1 == self.params.get("steps"):
            self._t_round = now
            self._send("round", epoch=self._epoch, round=batch + 1, loss=(logs or {}).get("loss"))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        seconds = max((self._t_last_round or time.perf_counter()) - self._t_epoch, 1e-9)
        logs = dict(logs or {})
        info = self.params.get("daskml") or {}
        rows = [int(r) for r in info.get("stream_rows") or []]
        workers = list(info.get("workers") or [])
        batch = float(self.describe.get("batch_size") or 0) or None
        per_worker = {workers[i] if i < len(workers) else f"stream {i}": {
            "rows_per_s": r / seconds, "steps_per_s": (r / batch / seconds) if batch else None}
            for i, r in enumerate(rows)}
        self._send("epoch", epoch=epoch, logs=logs, seconds=seconds, rows_per_s=sum(rows) / seconds,
                   workers=per_worker, traffic=traffic_rates(logs, self.describe, seconds))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._send("end", status="finished")


async def _log_event(scheduler: Any, topics: list[str], msg: dict[str, Any]) -> None:
    """``Scheduler.log_event`` over the client's connection pool; a failure is only logged."""
    try:
        await scheduler.log_event(topic=topics, msg=msg)
    except Exception:
        logger.debug("daskml_scale.fit: an event for the dashboard was lost", exc_info=True)


def traffic_rates(logs: dict[str, Any], describe: dict[str, Any], seconds: float) -> dict[str, float]:
    """The strategy's messages per second in an epoch: a parameter server's applied pushes,
    an all-reduce's reduces (its local steps over ``every``)."""
    out: dict[str, float] = {}
    if logs.get("ps_applied") is not None:
        out["pushes_per_s"] = float(logs["ps_applied"]) / seconds
    if logs.get("allreduce_steps") is not None and describe.get("every"):
        out["reduces_per_s"] = float(logs["allreduce_steps"]) / float(describe["every"]) / seconds
    if logs.get("allreduce_mb_sent") is not None:
        out["mb_sent_per_s"] = float(logs["allreduce_mb_sent"]) / seconds
    return out


_registered: set[str] = set()


def ensure_dashboard(client: Any) -> bool:
    """Register :class:`DaskmlDashboard` on the client's scheduler, once per scheduler
    (bounded; a scheduler that cannot take it, e.g. without daskml_scale installed, only
    loses the page)."""
    if not config.get("dashboard.enabled", True):
        return False
    address = getattr(client.scheduler, "address", None)
    if address in _registered:
        return True
    from daskml_scale._utils import waits

    try:
        waits.within(lambda: client.register_plugin(DaskmlDashboard()), 10.0,
                     "registering the daskml dashboard page", "The fit goes on without it.", None)
    except Exception as exc:
        logger.info("daskml_scale: the scheduler did not take the dashboard page: %s", exc)
        return False
    _registered.add(address)
    return True


def dashboard_url(client: Any) -> str | None:
    """The address of the daskml page of the client's scheduler (None without a dashboard)."""
    link = getattr(client, "dashboard_link", None)
    if not link:
        return None
    return link.rsplit("/", 1)[0] + "/daskml"


# ------------------------------------------------------------------------------ the scheduler's side
def fit_state(events: Any) -> dict[str, Any]:
    """One fit's state from its events (``(time, msg)`` pairs, in order)."""
    state: dict[str, Any] = {"status": "running", "epoch": 0, "round": 0, "history": {}, "rates": []}
    for stamp, msg in events:
        kind = msg.get("kind")
        state["updated"] = max(stamp, state.get("updated", stamp))
        if kind == "start":
            state.update(fit=msg["fit"], started=stamp, epochs=msg.get("epochs"), rounds=msg.get("rounds"),
                         info=msg.get("fit_info") or {}, workers=msg.get("workers") or [])
        elif kind == "epoch_begin":
            state.update(epoch=int(msg["epoch"]), round=0)
        elif kind == "round":
            state.update(round=msg.get("round"), round_loss=msg.get("loss"))
        elif kind == "epoch":
            state["epoch"] = int(msg["epoch"]) + 1
            for k, v in (msg.get("logs") or {}).items():
                state["history"].setdefault(k, []).append(v)
            state["rates"].append({k: msg.get(k) for k in ("epoch", "seconds", "rows_per_s", "workers", "traffic")})
        elif kind == "end":
            state["status"] = msg.get("status", "finished")
    return state


def fits_payload(scheduler: Any, fit_id: str | None = None) -> dict[str, Any]:
    """What ``/daskml/data.json`` answers: every fit this scheduler saw, and one in full
    (``fit_id``, or the latest)."""
    index: dict[str, dict[str, Any]] = {}
    for stamp, msg in scheduler.get_events(INDEX_TOPIC):
        entry = index.setdefault(msg["fit"], {"fit": msg["fit"], "started": stamp, "status": "running"})
        if msg.get("kind") == "end":
            entry["status"] = msg.get("status", "finished")
    fits = sorted(index.values(), key=lambda e: e["started"])
    chosen = fit_id or (fits[-1]["fit"] if fits else None)
    current = None
    if chosen:
        events = [*scheduler.get_events(fit_topic(chosen)), *scheduler.get_events(fit_topic(chosen, progress=True))]
        # in the driver's order: events travel on several connections and may land out of order
        current = fit_state(sorted(events, key=lambda e: e[1].get("time", e[0])))
    return {"fits": fits, "fit": current, "now": time.time()}


class DataHandler(RequestHandler):
    """``GET /daskml/data.json[?fit=ID]``."""

    def get(self) -> None:
        payload = fits_payload(self.server, self.get_argument("fit", None))
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(_clean(payload)))


class PageHandler(RequestHandler):
    """``GET /daskml``: the page (it reads ``data.json`` every second)."""

    def get(self) -> None:
        from daskml_scale._dashboard_page import PAGE

        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(PAGE)


routes: list[tuple[str, type, dict[str, Any]]] = [
    (r"daskml", PageHandler, {}),
    (r"daskml/data.json", DataHandler, {}),
]

_with_routes: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _prefix(app: Any) -> str:
    """The scheduler's URL prefix (``dask scheduler --dashboard-prefix``), read off its
    ``health`` route; ``/`` when it cannot be told."""
    for rule in getattr(getattr(app, "wildcard_router", None), "rules", []):
        pattern = getattr(getattr(rule.matcher, "regex", None), "pattern", "")
        if pattern.endswith("health$"):
            return pattern[: -len("health$")] or "/"
    return "/"


def add_routes(scheduler: Any) -> bool:
    """Add the daskml page's routes to a running scheduler's web server (once)."""
    app = getattr(scheduler, "http_application", None)
    if app is None:
        return False
    if app in _with_routes or any(
        "daskml/data.json" in getattr(getattr(r.matcher, "regex", None), "pattern", "")
        for r in getattr(app.wildcard_router, "rules", [])
    ):
        return True
    prefix = _prefix(app)
    app.add_handlers(r".*", [(prefix + url, cls, {**kw, "dask_server": scheduler}) for url, cls, kw in routes])
    _with_routes.add(app)
    return True


class DaskmlDashboard(SchedulerPlugin):
    """The scheduler plugin that adds the daskml page to a running scheduler."""

    name = "daskml-dashboard"

    async def start(self, scheduler: Any) -> None:
        add_routes(scheduler)
