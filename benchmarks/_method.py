"""The one method every benchmark uses, and the results file behind every figure.

A benchmark builds :class:`Variant` s (a name, a callable, the settings it runs
with) and hands them to :meth:`Benchmark.compare`, which

* runs every variant once as a warm-up, then all of them in interleaved rounds
  (the order rotates each round, so that a slow spell of a shared machine falls on
  every side): 3 rounds, 5 when any warm-up took under 2 s (``--rounds`` forces a
  number, ``--quick`` takes 2 and marks the results as not a figure);
* reports every side's min, median and max over the same rounds;
* computes each :class:`Ratio` median against median, with best against best
  beside it (never alone);
* records a side whose call raised, or returned ``{"errors": n}`` with ``n > 0``,
  as failed: it is not timed, its ratios are not computed, and it is not run again;
* records the load average at the start and the end.

:meth:`Benchmark.write` saves ``benchmarks/results/<name>.json``: the machine,
the versions, the date, the command line, the benchmark's settings, and per
comparison every round of every side, each side's settings and the ratios.
``benchmarks/make_docs.py`` renders those files into the docs.

A variant's callable takes no argument and returns ``None`` or a dict of
measurements (numbers, or small JSON values). ``seconds`` (its wall time) is
filled in unless the callable returns its own; a comparison's ``metric`` names the
measurement its ratios use (``seconds`` by default, or e.g. ``step_ms``,
``rows_s``), and ``better`` says which way is better.

Example::

    bench = Benchmark.from_args("predict", args, description="CSV -> predictions CSV")
    cmp = bench.compare(
        "files", "CSV -> predictions CSV, 2.2M rows",
        [Variant("ours", run_ours, "predict_files, 2 workers", {"workers": 2}),
         Variant("single", run_single, "one process, pyarrow writer", {"writer": "pyarrow"})],
        ratios=[Ratio("ours", "single", "predict_files vs the best single-process script", target=">= 1.3x")],
    )
    bench.write()
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "Variant",
    "Ratio",
    "Comparison",
    "Benchmark",
    "add_arguments",
    "rounds_for",
    "RESULTS_DIR",
    "SCHEMA",
]

SCHEMA = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

#: rounds after the warm-up: at least 3, and 5 when a warm-up took under this many seconds
SHORT_S = 2.0
MIN_ROUNDS = 3
SHORT_ROUNDS = 5
QUICK_ROUNDS = 2

VERSIONS = ("numpy", "pandas", "tensorflow", "keras", "dask", "distributed", "pyarrow")
#: environment variables that change the figures, recorded when set
ENVIRONMENT = (
    "KERAS_BACKEND", "TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "CUDA_VISIBLE_DEVICES",
)


# ----------------------------------------------------------------------------- parts
@dataclass
class Variant:
    """One side of a comparison.

    Parameters
    ----------
    name : str
        A short key (``"ours"``, ``"single"``), used in ratios and the results file.
    fn : callable
        Runs the work once; returns a dict of measurements (any other value is ignored). Raise, or
        return ``{"errors": n}`` with ``n > 0``, to report the round as failed.
    label : str
        What the side is, in words (printed and rendered in the docs).
    settings : dict
        The settings it runs with (printed, and kept in the results file): for a
        baseline, the script's settings a reader needs to reproduce it.
    """

    name: str
    fn: Callable[[], Mapping[str, Any] | None]
    label: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ratio:
    """How one side compares with another, median against median.

    ``kind="speedup"`` (default): how many times better ``subject`` is than
    ``reference`` (``reference / subject`` for a metric where lower is better,
    ``subject / reference`` where higher is better): above 1 means ``subject`` wins.
    ``kind="relative"``: the metric of ``subject`` over that of ``reference``
    (e.g. a step time in units of the baseline's step time).
    ``headline``: the ratio the README quotes for this benchmark.
    """

    subject: str
    reference: str
    label: str = ""
    kind: str = "speedup"
    target: str | None = None
    headline: bool = False


def rounds_for(warmup_seconds: Sequence[float], quick: bool = False, forced: int | None = None) -> int:
    """Rounds after the warm-up: ``forced`` if given, 2 if quick, else 3 (5 if any warm-up < 2 s)."""
    if forced is not None:
        return forced
    if quick:
        return QUICK_ROUNDS
    if warmup_seconds and min(warmup_seconds) < SHORT_S:
        return SHORT_ROUNDS
    return MIN_ROUNDS


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover  (not every platform has one)
        return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0 or abs(v) >= 1000 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))}f}"


# ----------------------------------------------------------------------- comparison
@dataclass
class _Side:
    variant: Variant
    warmup: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    failed_in: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summaries(self) -> dict[str, dict[str, float]]:
        if not self.ok or not self.rounds:
            return {}
        keys = [k for k in self.rounds[0] if all(_number(r.get(k)) for r in self.rounds)]
        return {k: _summary([float(r[k]) for r in self.rounds]) for k in keys}


class Comparison:
    """The sides of one comparison, their rounds and their ratios (see :meth:`Benchmark.compare`)."""

    def __init__(
        self, key: str, title: str, variants: Sequence[Variant], *, metric: str, unit: str, better: str,
        ratios: Sequence[Ratio], show: Sequence[str], notes: Sequence[str],
    ) -> None:
        if better not in ("lower", "higher"):
            raise ValueError(f"Expected better='lower' or 'higher'. Received: better={better!r}")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected distinct variant names. Received: {names}")
        for r in ratios:
            if r.subject not in names or r.reference not in names:
                raise ValueError(f"Ratio {r.subject!r} vs {r.reference!r} names a side that is not one of {names}")
            if r.kind not in ("speedup", "relative"):
                raise ValueError(f"Expected kind='speedup' or 'relative'. Received: kind={r.kind!r}")
        self.key, self.title = key, title
        self.metric, self.unit, self.better = metric, unit, better
        self.sides = {v.name: _Side(v) for v in variants}
        self.ratios = list(ratios)
        self.show = list(show)
        self.notes = list(notes)
        self.n_rounds = 0
        self.loadavg: dict[str, Any] = {}
        self.started = self.finished = ""

    # -- running
    def _call(self, side: _Side, stage: str) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            out = side.variant.fn()
        except Exception as exc:  # noqa: BLE001  (a failed side is a result, not a crash)
            side.error = _short(f"{type(exc).__name__}: {exc}")
            side.failed_in = stage
            tb = traceback.format_exc(limit=6)
            print(f"  FAILED {side.variant.name} ({stage}): {side.error}\n{tb}", file=sys.stderr, flush=True)
            return None
        wall = time.perf_counter() - t0
        rec: dict[str, Any] = {"wall_s": wall}
        if isinstance(out, Mapping):  # anything else a callable returns is not a measurement
            rec.update({k: _jsonable(v) for k, v in dict(out).items()})
        rec.setdefault("seconds", wall)
        errors = rec.get("errors")
        if errors:
            side.error = f"{errors} errors"
            if rec.get("error"):
                side.error += f" (first: {_short(str(rec['error']))})"
            side.failed_in = stage
            print(f"  FAILED {side.variant.name} ({stage}): {side.error}", file=sys.stderr, flush=True)
            return None
        if self.metric not in rec or not _number(rec[self.metric]):
            side.error = f"the round did not report the metric {self.metric!r} as a number: {rec}"
            side.failed_in = stage
            print(f"  FAILED {side.variant.name} ({stage}): {side.error}", file=sys.stderr, flush=True)
            return None
        return rec

    def run(self, quick: bool, forced_rounds: int | None, verbose: bool = True) -> "Comparison":
        self.started = _now()
        self.loadavg["start"] = _loadavg()
        sides = list(self.sides.values())
        if verbose:
            print(f"\n== {self.title}", flush=True)
        for side in sides:  # one warm-up each
            side.warmup = self._call(side, "warm-up")
        walls = [s.warmup["wall_s"] for s in sides if s.warmup is not None]
        self.n_rounds = rounds_for(walls, quick, forced_rounds)
        if verbose:
            done = ", ".join(f"{s.variant.name} {_fmt(s.warmup['wall_s']) if s.warmup else 'FAILED'} s" for s in sides)
            print(f"   warm-ups: {done} -> {self.n_rounds} interleaved rounds", flush=True)
        for i in range(self.n_rounds):
            order = sides[i % len(sides):] + sides[: i % len(sides)]
            for side in order:
                if side.ok:
                    rec = self._call(side, f"round {i + 1}")
                    if rec is not None:
                        side.rounds.append(rec)
        self.loadavg["end"] = _loadavg()
        self.finished = _now()
        if verbose:
            self.print()
        return self

    # -- results
    def summary(self, name: str) -> dict[str, float] | None:
        """min / median / max of the metric for one side, or None if it failed."""
        return self.sides[name].summaries().get(self.metric)

    def median(self, name: str, key: str | None = None) -> float | None:
        s = self.sides[name].summaries().get(key or self.metric)
        return None if s is None else s["median"]

    def _best(self, s: dict[str, float]) -> float:
        return s["min"] if self.better == "lower" else s["max"]

    def ratio_values(self, r: Ratio) -> dict[str, Any]:
        a, b = self.summary(r.subject), self.summary(r.reference)
        if self.better == "lower" and r.kind == "speedup":
            definition = f"median {self.metric} of {r.reference} / median {self.metric} of {r.subject}"
        else:
            definition = f"median {self.metric} of {r.subject} / median {self.metric} of {r.reference}"
        out: dict[str, Any] = {
            "subject": r.subject, "reference": r.reference, "label": r.label or f"{r.subject} vs {r.reference}",
            "kind": r.kind, "definition": definition, "target": r.target, "headline": r.headline,
            "median": None, "best": None, "status": "ok",
        }
        if a is None or b is None:
            out["status"] = "failed"
            return out
        am, bm, ab, bb = a["median"], b["median"], self._best(a), self._best(b)
        invert = self.better == "lower" and r.kind == "speedup"
        try:
            out["median"] = bm / am if invert else am / bm
            out["best"] = bb / ab if invert else ab / bb
        except ZeroDivisionError:
            out["status"] = "failed"
        return out

    def print(self) -> None:
        width = max(len(n) for n in self.sides)
        print(f"   {self.metric} ({self.unit}, {self.better} is better), {self.n_rounds} rounds each: "
              f"median [min - max]")
        for name, side in self.sides.items():
            v = side.variant
            if not side.ok:
                print(f"   {name:<{width}}  FAILED in {side.failed_in}: {side.error}   {v.label}")
                continue
            s = self.summary(name)
            extra = ""
            for key in self.show:
                m = self.median(name, key)
                if m is not None:
                    extra += f"  {key} {_fmt(m)}"
            print(f"   {name:<{width}}  {_fmt(s['median']):>8} [{_fmt(s['min'])} - {_fmt(s['max'])}]{extra}   {v.label}")
        for name, side in self.sides.items():
            if side.variant.settings:
                print(f"   settings of {name}: {_settings_text(side.variant.settings)}")
        for r in self.ratios:
            rv = self.ratio_values(r)
            target = f"  (target {r.target})" if r.target else ""
            if rv["status"] != "ok":
                print(f"   RATIO {rv['label']}: not computed, a side failed{target}")
            else:
                print(f"   RATIO {rv['label']}: {rv['median']:.2f}x median/median "
                      f"(best/best {rv['best']:.2f}x){target}")
        for n in self.notes:
            print(f"   note: {n}")
        la = self.loadavg
        print(f"   load average {la.get('start')} -> {la.get('end')}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.sides.items() if not s.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "title": self.title, "metric": self.metric, "unit": self.unit, "better": self.better,
            "rounds": self.n_rounds, "started": self.started, "finished": self.finished, "loadavg": self.loadavg,
            "show": self.show, "notes": self.notes,
            "status": "failed" if self.failed else "ok",
            "sides": {
                name: {
                    "label": s.variant.label, "settings": _jsonable(s.variant.settings),
                    "status": "ok" if s.ok else "failed", "error": s.error, "failed_in": s.failed_in,
                    "warmup": s.warmup, "rounds": s.rounds, "summary": s.summaries(),
                }
                for name, s in self.sides.items()
            },
            "ratios": [self.ratio_values(r) for r in self.ratios],
        }


# ------------------------------------------------------------------------ benchmark
def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick``, ``--rounds``, ``--results-dir``, ``--no-results``."""
    g = ap.add_argument_group("method")
    g.add_argument("--quick", action="store_true",
                   help="small data, 2 rounds: checks the script end to end; its results file is marked quick "
                        "and make_docs.py refuses it")
    g.add_argument("--rounds", type=int, default=None,
                   help=f"rounds after the warm-up (default {MIN_ROUNDS}, {SHORT_ROUNDS} when a warm-up takes "
                        f"under {SHORT_S:g} s)")
    g.add_argument("--results-dir", default=str(RESULTS_DIR), help="where <name>.json is written")
    g.add_argument("--no-results", action="store_true", help="print only, write no results file")
    return ap


class Benchmark:
    """One benchmark script's run: its comparisons and its results file."""

    def __init__(
        self, name: str, *, description: str = "", quick: bool = False, settings: Mapping[str, Any] | None = None,
        rounds: int | None = None, results_dir: str | os.PathLike[str] = RESULTS_DIR, write_results: bool = True,
    ) -> None:
        if rounds is not None and rounds < MIN_ROUNDS and not quick:
            raise ValueError(f"Expected at least {MIN_ROUNDS} rounds (or --quick). Received: rounds={rounds}")
        self.name, self.description, self.quick = name, description, quick
        self.settings = dict(settings or {})
        self.rounds = rounds
        self.results_dir = Path(results_dir)
        self.write_results = write_results
        self.comparisons: list[Comparison] = []
        self.notes: list[str] = []
        self.facts: dict[str, Any] = {}
        self.started = _now()
        self.loadavg: dict[str, Any] = {"start": _loadavg()}
        self._t0 = time.perf_counter()
        tag = "  [QUICK: a check of the script, not a figure]" if quick else ""
        print(f"{name}: {description}{tag}\nmachine: {_machine()['cores']} cores, load average "
              f"{self.loadavg['start']}", flush=True)

    @classmethod
    def from_args(cls, name: str, args: argparse.Namespace, *, description: str = "", **kw: Any) -> "Benchmark":
        settings = {k: v for k, v in vars(args).items() if k not in ("results_dir", "no_results")}
        return cls(name, description=description, quick=args.quick, settings=settings, rounds=args.rounds,
                   results_dir=args.results_dir, write_results=not args.no_results, **kw)

    def compare(
        self, key: str, title: str, variants: Sequence[Variant], *, metric: str = "seconds", unit: str = "s",
        better: str = "lower", ratios: Sequence[Ratio] | None = None, show: Sequence[str] = (),
        notes: Sequence[str] = (), rounds: int | None = None,
    ) -> Comparison:
        """Warm up and run ``variants`` in interleaved rounds; print and keep the result.

        ``ratios`` defaults to every other side against the first (speedup). ``show``
        names further measurements printed and rendered beside the metric (their medians).
        """
        if ratios is None:
            ratios = [Ratio(v.name, variants[0].name) for v in variants[1:]]
        cmp = Comparison(key, title, variants, metric=metric, unit=unit, better=better, ratios=ratios,
                         show=show, notes=notes)
        cmp.run(self.quick, rounds if rounds is not None else self.rounds)
        self.comparisons.append(cmp)
        return cmp

    def note(self, text: str) -> None:
        """A sentence kept in the results file and rendered under the figures."""
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def fact(self, key: str, value: Any) -> None:
        """A measured or derived number that is not a comparison (e.g. a data size)."""
        self.facts[key] = _jsonable(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "description": self.description,
            "quick": self.quick,
            "date": self.started,
            "finished": _now(),
            "duration_s": round(time.perf_counter() - self._t0, 1),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
            "machine": _machine(),
            "versions": _versions(),
            "git": _git(),
            "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
            "loadavg": {**self.loadavg, "end": _loadavg()},
            "settings": _jsonable(self.settings),
            "method": {
                "warmup": "one call of each side before the rounds",
                "rounds": f"{MIN_ROUNDS}, or {SHORT_ROUNDS} when a warm-up took under {SHORT_S:g} s; "
                          f"{QUICK_ROUNDS} with --quick; the order rotates each round",
                "ratio": "median against median; best against best beside it",
                "failed": "a side that raised or reported errors is failed, not timed",
            },
            "status": "failed" if any(c.failed for c in self.comparisons) else "ok",
            "facts": self.facts,
            "notes": self.notes,
            "comparisons": [c.to_dict() for c in self.comparisons],
        }

    def write(self) -> Path | None:
        """Write ``<results_dir>/<name>.json`` (unless ``--no-results``); returns its path."""
        data = _jsonable(self.to_dict())
        print(f"\nload average {data['loadavg']['start']} -> {data['loadavg']['end']}; {data['duration_s']} s")
        failed = [f"{c.key}:{n}" for c in self.comparisons for n in c.failed]
        if failed:
            print(f"FAILED sides (not timed): {', '.join(failed)}")
        if not self.write_results:
            return None
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
        print(f"results: {path}" + ("  (quick: not a figure)" if self.quick else ""))
        return path

    def exit_code(self) -> int:
        """1 when a side failed, else 0."""
        return 1 if any(c.failed for c in self.comparisons) else 0


# --------------------------------------------------------------------------- context
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _machine() -> dict[str, Any]:
    mem = None
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except Exception:  # noqa: BLE001
        try:
            with open("/proc/meminfo") as f:
                mem = int(f.readline().split()[1]) * 1024
        except OSError:
            pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(), "usable_cores": usable, "memory_bytes": mem,
        "memory_gib": round(mem / 2**30, 1) if mem else None, "cpu": cpu,
        "platform": platform.platform(),
    }


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in (*VERSIONS, "daskml_scale"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git() -> dict[str, Any]:
    def run(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", "--no-optional-locks", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _short(text: str, limit: int = 300) -> str:
    """An error message for a table: its first lines, at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _jsonable(v: Any) -> Any:
    """Plain JSON values: NumPy scalars to Python, non-finite floats to None, tuples to lists."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "shape", None) == ():
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)
