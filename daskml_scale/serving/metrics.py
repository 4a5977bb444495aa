"""Prometheus text-format metrics, written by hand (no dependency).

Only what the server needs: counters with labels and fixed-bucket histograms, all
updated from the event loop thread or the single model thread (each update is a few
integer operations under the GIL; a lock keeps a scrape consistent).
"""

from __future__ import annotations

import bisect
import threading
from typing import Iterable, Sequence

__all__ = ["Counter", "Histogram", "Registry", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    body = ",".join(
        f'{n}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), "")}"'
        for n, v in zip(names, values)
    )
    return "{" + body + "}"


def _num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    """A monotonically increasing count, optionally split by labels."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, *labelvalues: str) -> None:
        with self._lock:
            self._values[labelvalues] = self._values.get(labelvalues, 0.0) + amount

    def value(self, *labelvalues: str) -> float:
        return self._values.get(tuple(labelvalues), 0.0)

    def total(self) -> float:
        return sum(self._values.values())

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]
        for lv, v in items:
            yield f"{self.name}{_labels(self.labelnames, lv)} {_num(v)}"


class Histogram:
    """Observations counted in cumulative buckets, with their sum and count."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.bounds = sorted(float(b) for b in buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            counts, total = list(self._counts), self._sum
        acc = 0
        for bound, c in zip([*self.bounds, float("inf")], counts):
            acc += c
            yield f'{self.name}_bucket{{le="{_num(bound)}"}} {acc}'
        yield f"{self.name}_sum {_num(total)}"
        yield f"{self.name}_count {acc}"


class Registry:
    """The server's metrics."""

    def __init__(self) -> None:
        self.requests = Counter(
            "daskml_scale_requests_total", "HTTP requests answered, by endpoint, method and status.",
            ("endpoint", "method", "status"),
        )
        self.errors = Counter(
            "daskml_scale_request_errors_total", "HTTP requests answered with a 4xx or 5xx status, by endpoint.",
            ("endpoint", "status"),
        )
        self.latency = Histogram(
            "daskml_scale_request_latency_seconds", "Time from request start to response end.",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.batch_rows = Histogram(
            "daskml_scale_batch_rows", "Rows per model call (after micro-batching).",
            (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
        )
        self.batch_requests = Histogram(
            "daskml_scale_batch_requests", "Requests coalesced into one model call.",
            (1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.model_seconds = Histogram(
            "daskml_scale_model_call_seconds", "Time of one model call (preprocess + predict).",
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.rows = Counter("daskml_scale_predicted_rows_total", "Rows predicted.")
        self.jobs = Counter("daskml_scale_jobs_total", "Batch jobs, by final state.", ("state",))
        self.client_gone = Counter("daskml_scale_client_gone_total",
                                   "Requests dropped before the model call: their client had disconnected.")
        self.overloaded = Counter("daskml_scale_overloaded_total",
                                  "Requests refused with 503 because the queue was full (serve.max-queue-rows).")

    def render(self) -> str:
        lines: list[str] = []
        for m in (
            self.requests, self.errors, self.latency, self.batch_rows,
            self.batch_requests, self.model_seconds, self.rows, self.jobs, self.overloaded, self.client_gone,
        ):
            lines.extend(m.render())
        return "\n".join(lines) + "\n"
