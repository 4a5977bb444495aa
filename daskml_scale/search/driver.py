"""The driver side of :func:`daskml_scale.search`: the data prepared once, trials run at
once on the workers, epoch by epoch, and Optuna told how each one went.

One trial runs on one worker thread, on that worker's copy of the data
(:mod:`daskml_scale.search.worker`); as many trials run at once as the cluster has
threads (``max_concurrent``). Each epoch is one task; its objective goes to Optuna
(``trial.report``) and the pruner decides (``trial.should_prune``) before the next
epoch is sent, so a pruned trial stops at the end of an epoch. The driver keeps each
running trial's last state: a worker lost mid-epoch costs that epoch, rerun elsewhere
by Dask from the same state. Trials whose models share a shape train together, as one
stacked program per pack (:mod:`daskml_scale.search.packs`), each still reported,
pruned and failed on its own.
"""

from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from typing import Any, Callable

import dask
import numpy as np

from daskml_scale import backend, config
from daskml_scale._utils import waits
from daskml_scale.exceptions import ArgumentError, DataError, WorkersLostError
from daskml_scale.search import worker as sw
from daskml_scale.search.packs import _MISSING_DATA_RETRIES, PackScheduling, _Pack, _Run, trial_seed
from daskml_scale.search.progress import Progress, wants_progress
from daskml_scale.search.result import SearchResult
from daskml_scale.search.space import Param
from daskml_scale.search.study import make_pruner, make_sampler, open_study, recover_stale
from daskml_scale.training.worker import prepare_partition, sample_rows

logger = logging.getLogger(__name__)

__all__ = ["Search", "trial_seed"]

_POLL_S = 0.5


class Search(PackScheduling):
    """One call of :func:`daskml_scale.search`, from the data to the result."""

    def __init__(
        self, *, client: Any, build_model: Callable[..., Any], style: str, space: dict[str, Param] | None,
        data: Any, preprocessor: Any, trials: int, epochs: int, objective: str, direction: str,
        algorithm: Any, pruner: Any, max_concurrent: int | None, validation_data: Any,
        validation_fraction: float, seed: int, storage: Any, study_name: str, batch_size: int, verbose: Any,
        stack: bool = True,
    ) -> None:
        self.client = client
        self.build_model = build_model
        self.style = style
        self.space: dict[str, Param] = dict(space or {})
        self.data = data
        self.pre = preprocessor
        self.trials = trials
        self.epochs = epochs
        self.objective = objective
        self.direction = direction
        self.algorithm = algorithm
        self.pruner = pruner
        self.max_concurrent = max_concurrent
        self.validation_data = validation_data
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.storage = storage
        self.study_name = study_name
        self.batch_size = batch_size
        self.verbose = verbose
        self.search_id = f"search-{uuid.uuid4().hex[:8]}"
        self.context: dict[str, Any] = {}
        self.layout: Any = None
        self.sample: tuple[np.ndarray, np.ndarray] | None = None
        self.metric_names: list[str] = []
        self.sources: list[Any] = []
        self.val_sources: list[Any] | None = None
        self.loaded: dict[str, dict[str, Any]] = {}  # worker -> its load_data result
        self._loading: dict[str, Any] = {}  # worker -> the load task
        self._refused: set[str] = set()  # workers whose copy failed (after the start)
        self.builder = sw.pack_builder(build_model)
        self.study: Any = None
        self.best: tuple[int, float, Any, int] | None = None  # (trial number, value, state, best epoch)
        self.timings: dict[str, float] = {}
        self.events: list[str] = []
        self.lost_workers: set[str] = set()
        self._known: set[str] = set()
        self._live: list[str] = []
        self.counts = {"complete": 0, "pruned": 0, "failed": 0, "running": 0}
        self.progress = Progress(trials, objective, enabled=False)
        self.exhausted = False  # the sampler has tried its whole space
        self.stack, self.stack_reasons, self._pending, self._packs_made = stack, {}, [], 0

    # ------------------------------------------------------------------ running
    def run(self) -> SearchResult:
        try:
            return self._run()
        finally:
            self._release()

    def _run(self) -> SearchResult:
        t0 = time.perf_counter()
        self._probe()  # build the model with its defaults: the space, the metrics, bad input
        sampler = make_sampler(self.algorithm, self.seed, self.trials)
        pruner = make_pruner(self.pruner, self.algorithm, self.epochs)
        self.study = open_study(self.storage, self.study_name, self.direction, sampler, pruner)
        stale = recover_stale(self.study)
        if stale:
            logger.warning("daskml_scale.search: trials %s of study %r were left running by a driver that stopped; "
                           "they are marked failed and run again", stale, self.study_name)
        if len(self.study.trials) > len(stale):  # resumed: the sampler does not draw the first points again
            self.study.sampler = make_sampler(self.algorithm, self.seed + len(self.study.trials), self.trials)
        t1 = time.perf_counter()
        self._prepare()
        self.timings["prepare_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        self._loop()
        self.live_workers()  # a worker lost while results kept coming (no idle poll saw it) is counted too
        self.timings["trials_s"] = time.perf_counter() - t2
        self._ensure_best_state()
        self.timings["total_s"] = time.perf_counter() - t0
        return SearchResult(
            study=self.study, objective=self.objective, direction=self.direction, space=self.space,
            build_model=self.build_model, style=self.style, context=self.context, layout=self.layout,
            sample=self.sample, best=self.best, epochs=self.epochs, seed_of=lambda n: trial_seed(self.seed, n),
            summary={"timings": {k: round(v, 3) for k, v in self.timings.items()}, "workers": sorted(self.loaded),
                     "lost_workers": sorted(self.lost_workers), "stale_trials": stale,
                     "stacking": self.stacking_summary(), "train_rows": self._rows("train_rows"), "validation_rows": self._rows("validation_rows")},
        )

    def _rows(self, key: str) -> int:
        return int(next(iter(self.loaded.values()))[key]) if self.loaded else 0

    # ------------------------------------------------------------------ the default model
    def _placeholder_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        meta = getattr(self.data, "_meta_nonempty", None)
        if meta is None:
            return None
        try:
            X, y = self.pre.transform(meta.head(2))
        except Exception:  # noqa: BLE001  (the user's transform does not run on placeholder rows)
            return None
        return (X, y) if y is not None and len(X) else None

    def defaults(self) -> dict[str, Any]:
        return {n: p.default for n, p in self.space.items()}

    def _probe(self) -> None:
        """Build the model once on the driver with every parameter at its default: finds
        the space of a ``build_model(hp)``, the metrics the model computes, and the input
        layout; fails here, before any work, on a model or an objective that cannot be used."""
        import inspect

        from daskml_scale.features import attach_layout

        try:
            names = inspect.signature(self.build_model).parameters
        except (TypeError, ValueError):
            names = {}
        self.context = {k: v for k, v in (("n_features", self.pre.n_features_), ("preprocessor", self.pre))
                        if k in names}
        try:
            model, hp = sw.call_builder(self.build_model, self.style, self.defaults(), self.context)
            sw.check_model(model)
        except Exception as exc:
            raise ArgumentError(f"build_model failed with the default parameters {self.defaults()}: "
                                f"{type(exc).__name__}: {exc}") from exc
        if hp is not None:
            self.space = dict(hp.declared)
            if not any(p.distribution is not None for p in self.space.values()):
                raise ArgumentError(
                    "Expected build_model(hp) to declare at least one parameter to search (hp.Int, hp.Float, "
                    "hp.Choice, hp.Boolean). Received: an empty space"
                    + (f" (only fixed values {sorted(self.space)})" if self.space else ""))
        self.layout = attach_layout(model, self.pre, error=ArgumentError)
        self.sample = self._placeholder_rows()
        if self.sample is None:
            return  # checked once the data is prepared
        self._check_objective(model)

    def _check_objective(self, model: Any) -> None:
        X, y = self.sample
        backend.ensure_built(model, X, y)
        self.metric_names = list(backend.metric_results(model, backend.metric_state(model)))
        validated = self.validation_data is not None or self.validation_fraction > 0
        names = list(self.metric_names) + ([f"val_{n}" for n in self.metric_names] if validated else [])
        if self.objective not in names:
            hint = ""
            if self.objective.startswith("val_") and self.objective[4:] in self.metric_names:
                hint = " (a val_ objective needs validation_data or validation_fraction > 0)"
            raise ArgumentError(
                f"Expected objective to name a metric the model computes: one of {names}. Received: "
                f"objective={self.objective!r}{hint}. Add the metric to model.compile(metrics=[...]) in "
                "build_model, or choose one of those."
            )

    # ------------------------------------------------------------------ the data, once
    def _prepared(self, ddf: Any, val_fraction: float, tag: str, workers: list[str]) -> list[Any]:
        parts = ddf.to_delayed()
        if not parts:
            raise DataError("Expected training data with at least one partition. Received: an empty DataFrame")
        prepared = [
            dask.delayed(prepare_partition, pure=True)(
                p, self.pre, val_fraction, self.seed, i, dask_key_name=f"{tag}-prep-{self.search_id}-{i}")
            for i, p in enumerate(parts)
        ]
        out: list[Any] = [None] * len(prepared)
        n = len(workers)
        for w, addr in enumerate(workers):
            idx = list(range(w, len(prepared), n))
            if idx:
                for i, f in zip(idx, self.client.compute([prepared[i] for i in idx], workers=[addr],
                                                         allow_other_workers=True)):
                    out[i] = f
        return out

    def _prepare(self) -> None:
        workers = self.live_workers()
        if not workers:
            raise WorkersLostError("The cluster has no workers: start some, or call daskml_scale.connect()")
        self.sources = self._prepared(self.data, self.validation_fraction if self.validation_data is None else 0.0,
                                      "train", workers)
        if self.validation_data is not None:
            self.val_sources = self._prepared(self.validation_data, 0.0, "val", workers)
        for w in workers:
            self._start_loading(w)
        self._wait_loaded()
        if self.sample is None:  # the transform did not run on placeholder rows: the model is checked now
            self.sample = tuple(waits.result(self.client.submit(sample_rows, self.sources[0], pure=False),
                                             timeout=waits.wait_timeout(), what="search"))
            model, _ = sw.call_builder(self.build_model, self.style, self.defaults(), self.context)
            backend.set_input_layout(model, self.layout)
            self._check_objective(model)
        if self._rows("train_rows") == 0:
            raise DataError("Expected training rows. Received: 0 rows after reading and preprocessing the data")
        if self.objective.startswith("val_") and self._rows("validation_rows") == 0:
            raise DataError(f"Expected validation rows for objective={self.objective!r}. Received: 0 rows "
                            "(validation_fraction too small for the data, or empty validation_data)")

    def _start_loading(self, worker: str) -> None:
        if worker in self.loaded or worker in self._loading or worker in self._refused:
            return
        self._loading[worker] = self.client.submit(
            sw.load_data, self.search_id, self.sources, self.val_sources, pure=False, workers=[worker],
            allow_other_workers=False, key=f"daskml-search-load-{self.search_id}-{uuid.uuid4().hex[:6]}")

    def _collect_loading(self, strict: bool = True) -> None:
        """Note the workers whose copy of the data is ready. A copy that failed on a live
        worker is an error before the trials start (``strict``), a warning after: the
        search goes on with the workers that have one."""
        for w, fut in list(self._loading.items()):
            if fut.status == "finished":
                info = fut.result(timeout=waits.wait_timeout())
                if info["worker"] == w:
                    self.loaded[w] = info
                del self._loading[w]
            elif fut.status in ("error", "cancelled"):
                del self._loading[w]
                if w in self._live:
                    exc = fut.exception(timeout=waits.wait_timeout()) if fut.status == "error" else "cancelled"
                    if strict:
                        raise DataError(f"Preparing the search's data on {w} failed: {exc}")
                    logger.warning("daskml_scale.search: the worker %s could not take a copy of the data (%s); "
                                   "it runs no trial", w, exc)
                    self._refused.add(w)

    def _wait_loaded(self) -> None:
        deadline = time.monotonic() + waits.wait_timeout()
        while self._loading:
            self._collect_loading()
            if not self._loading:
                break
            live = self.live_workers()
            for w in [w for w in self._loading if w not in live]:
                self._loading.pop(w).release()
            if time.monotonic() > deadline:
                raise waits.stalled_error(self.client, {f: f"data for {w}" for w, f in self._loading.items()},
                                          waits.wait_timeout(), "search: preparing the data: not every worker",
                                          "Check the workers' logs and memory, then run again.")
            time.sleep(0.05)
        if not self.loaded:
            raise WorkersLostError("No worker could take the search's data: the workers were lost while it "
                                   "was prepared", workers=sorted(self.lost_workers))

    # ------------------------------------------------------------------ the cluster
    def live_workers(self) -> list[str]:
        self._live = sorted(self.client.nthreads())
        lost = self._known - set(self._live)
        if lost - self.lost_workers:
            logger.warning("daskml_scale.search: lost worker(s) %s; their trials' epochs are rerun elsewhere",
                           sorted(lost - self.lost_workers))
        self.lost_workers |= lost
        self._known |= set(self._live)
        for w in lost:
            self.loaded.pop(w, None)
        return self._live

    def _concurrency(self) -> int:
        if self.max_concurrent is not None:
            return self.max_concurrent
        nthreads = self.client.nthreads()
        return max(1, sum(int(nthreads.get(w, 1)) for w in self.loaded) or 1)

    # ------------------------------------------------------------------ the trials
    def _counted(self) -> int:
        import optuna

        stale = set(self.study.user_attrs.get("stale_trials", []))
        S = optuna.trial.TrialState
        return sum(1 for t in self.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.FAIL))
                   if t.number not in stale)

    def _distributions(self) -> dict[str, Any]:
        return {n: p.distribution for n, p in self.space.items() if p.distribution is not None}

    def _submit(self, run: _Run, done: "queue.SimpleQueue[Any]", running: dict[str, _Run]) -> None:
        if run.epoch == 0:  # asked ahead, it may have waited for a thread: its seconds start now
            run.started = time.perf_counter()
        fut = self.client.submit(
            sw.run_epoch, self.search_id, f"{self.search_id}/{run.trial.number}", self.builder, self.style,
            run.params, self.context, run.state, run.epoch, batch_size=self.batch_size,
            seed=trial_seed(self.seed, run.trial.number), layout=self.layout, pure=False,
            workers=sorted(self.loaded) or None,
            allow_other_workers=True,
            key=f"daskml-search-{self.search_id}-t{run.trial.number}-e{run.epoch}-{uuid.uuid4().hex[:6]}",
        )
        run.future = fut
        running[fut.key] = run
        fut.add_done_callback(done.put)  # called in distributed's thread, also when it is done already

    def _loop(self) -> None:
        to_start = max(0, self.trials - self._counted())
        progress = self.progress = Progress(self.trials, self.objective, enabled=wants_progress(self.verbose))
        self._count_existing()
        running: dict[str, _Run] = {}
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        no_worker_timeout = float(config.get("training.no-worker-timeout", 60))
        stall = waits.wait_timeout()
        last_progress = gone_since = None
        try:
            while to_start > 0 or running or self._pending:
                if self.exhausted:
                    to_start = 0
                while (to_start > 0 or self._pending) and len(running) < self._concurrency():
                    if not self._pending:
                        to_start -= self._ask_units(to_start)
                    unit = self._pending.pop(0)
                    if isinstance(unit, _Pack):
                        self._submit_pack(unit, done, running)
                    else:
                        self._submit(unit, done, running)
                self.counts["running"] = self.trials_in(running)
                progress.update(self.counts, self._best_text())
                try:
                    fut = done.get(timeout=_POLL_S)
                except queue.Empty:
                    live = self.live_workers()
                    now = time.monotonic()
                    if not live:
                        gone_since = gone_since or now
                        if now - gone_since > no_worker_timeout:
                            raise WorkersLostError(
                                f"Every worker is gone ({sorted(self.lost_workers)} lost) and none came back within "
                                f"{no_worker_timeout:.0f}s; the search stopped (its study keeps the trials so far)",
                                workers=sorted(self.lost_workers))
                        continue
                    gone_since = None
                    for w in live:
                        self._start_loading(w)  # workers that joined get the data too
                    self._collect_loading(strict=False)
                    last_progress = last_progress or now
                    if now - last_progress > stall:
                        raise waits.stalled_error(
                            self.client, {k: r.label for k, r in running.items()}, stall,
                            "search: no trial epoch", "Check the workers' logs, then resume from the storage.")
                    continue
                last_progress = time.monotonic()
                run = running.pop(fut.key, None)
                if isinstance(run, _Pack):
                    self._handle_pack(run, fut, done, running)
                elif run is not None:
                    self._handle(run, fut, done, running)
        finally:
            self.counts["running"] = self.trials_in(running)
            if running or self._pending:  # stopped by an error or an interrupt: those trials are run again on resume
                for r in running.values():
                    r.future.cancel()
                recover_stale(self.study)
            progress.update(self.counts, self._best_text())
            progress.close()

    def _count_existing(self) -> None:
        import optuna

        S = optuna.trial.TrialState
        stale = set(self.study.user_attrs.get("stale_trials", []))
        for t in self.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.FAIL)):
            if t.number in stale:
                continue
            self.counts[{S.COMPLETE: "complete", S.PRUNED: "pruned", S.FAIL: "failed"}[t.state]] += 1
            if t.state == S.COMPLETE and t.value is not None:
                self._offer_best(t.number, float(t.value), None, int(t.user_attrs.get("best_epoch", self.epochs - 1)))

    def _better(self, a: float, b: float | None) -> bool:
        if b is None:
            return True
        return a < b if self.direction == "minimize" else a > b

    def _offer_best(self, number: int, value: float, state: Any, best_epoch: int) -> None:
        if self.best is None or self._better(value, self.best[1]):
            self.best = (number, value, state, best_epoch)

    def _best_text(self) -> tuple[int, float] | None:
        return (self.best[0], self.best[1]) if self.best else None

    def _handle(self, run: _Run, fut: Any, done: "queue.SimpleQueue[Any]", running: dict[str, _Run]) -> None:
        """One epoch's result: report it, then prune, finish or send the next epoch."""
        r, error = self._outcome(fut)
        if r is None:
            self._fail(run, error or "")
            return
        if self._missing_data(run, r, lambda: self._submit(run, done, running), lambda why: self._fail(run, why)):
            return
        if r.get("worker") and (not run.workers or run.workers[-1] != r["worker"]):
            run.workers.append(r["worker"])
        run.compute_s += float(r.get("seconds", 0.0))
        run.build_s += float(r.get("build_s", 0.0))
        if "error" in r:
            logger.info("daskml_scale.search: trial %d failed: %s\n%s", run.trial.number, r["error"], r.get("traceback"))
            self._fail(run, r["error"])
            return
        for name, param in (r.get("declared") or {}).items():  # found under a branch the defaults did not take
            if name not in self.space:
                self.space[name] = param
                run.params.setdefault(name, param.default)
        logs = r["logs"]
        for k, v in logs.items():
            run.history.setdefault(k, []).append(float(v))
        value = logs.get(self.objective)
        if value is None or not math.isfinite(value):
            self._fail(run, f"the objective {self.objective!r} is {value} after epoch {run.epoch + 1}")
            return
        run.values.append(float(value))
        run.state = r["state"]
        if self._better(value, run.best_value):
            run.best_value, run.best_epoch, run.best_state = float(value), run.epoch, r["state"]
        if self._end_epoch(run, float(value)):
            self._submit(run, done, running)

    def _attrs(self, run: _Run, error: str | None = None) -> None:
        t = run.trial
        t.set_user_attr("epochs", run.epoch)
        t.set_user_attr("seconds", round(time.perf_counter() - run.started, 4))
        t.set_user_attr("compute_seconds", round(run.compute_s, 4))
        t.set_user_attr("build_seconds", round(run.build_s, 4))
        t.set_user_attr("worker", run.workers[-1] if run.workers else None)
        t.set_user_attr("workers", list(run.workers))
        t.set_user_attr("history", run.history)
        if run.pack is not None:
            t.set_user_attr("pack", run.pack)
            t.set_user_attr("pack_size", run.pack_size)
        if run.best_epoch is not None:
            t.set_user_attr("best_epoch", run.best_epoch)
        if error is not None:
            t.set_user_attr("error", error)
        for n, v in run.params.items():  # parameters Optuna did not draw: found in this trial, at their default
            if n not in t.params and f"fixed_{n}" not in t.user_attrs:
                t.set_user_attr(f"default_{n}", v)

    def _tell(self, trial: Any, value: float | None = None, state: Any = None) -> None:
        """``study.tell``; a sampler that has tried its whole space (Optuna's grid and brute-force
        samplers call ``study.stop()`` then, meant for ``study.optimize``) ends the search after
        the trials already running. The trial's state is stored either way."""
        try:
            self.study.tell(trial, value, state=state)
        except RuntimeError as exc:
            if "Study.stop" not in str(exc):
                raise
            self.exhausted = True

    def _fail(self, run: _Run, error: str) -> None:
        import optuna

        self._attrs(run, error)
        self._tell(run.trial, state=optuna.trial.TrialState.FAIL)
        self.counts["failed"] += 1
        self.progress.update(self.counts, self._best_text(), event=f"trial {run.trial.number} failed: {error[:120]}")

    def _finish(self, run: _Run, how: str) -> None:
        import optuna

        self._attrs(run)
        if how == "complete":
            self._tell(run.trial, run.best_value)
            self._offer_best(run.trial.number, float(run.best_value), run.best_state, int(run.best_epoch))
        else:
            self._tell(run.trial, state=optuna.trial.TrialState.PRUNED)
        self.counts[how] += 1
        self.progress.update(self.counts, self._best_text(),
                             event=f"trial {run.trial.number} {how} after {run.epoch} epochs: "
                                   f"{self.objective} {run.best_value:.5g}")

    # ------------------------------------------------------------------ the best model
    def _ensure_best_state(self) -> None:
        """The best trial finished under an earlier driver (a resumed search): its weights
        are not held, so it is trained again to its best epoch, on the same seed."""
        if self.best is None or self.best[2] is not None:
            return
        number, value, _, best_epoch = self.best
        trial = self.study.trials[number]
        params = {**trial.params, **{k[len("fixed_"):]: v for k, v in trial.user_attrs.items() if k.startswith("fixed_")},
                  **{k[len("default_"):]: v for k, v in trial.user_attrs.items() if k.startswith("default_")}}
        state = None
        key = f"{self.search_id}/refit-{number}"
        for epoch in range(best_epoch + 1):
            r: dict[str, Any] = {"missing_data": True}
            for _ in range(_MISSING_DATA_RETRIES + 1):
                fut = self.client.submit(
                    sw.run_epoch, self.search_id, key, self.builder, self.style, params, self.context, state, epoch,
                    batch_size=self.batch_size, seed=trial_seed(self.seed, number), layout=self.layout, pure=False,
                    workers=sorted(self.loaded) or None, allow_other_workers=True)
                r = waits.result(fut, timeout=waits.wait_timeout(), what="search: retraining the best trial")
                if not r.get("missing_data"):
                    break
                self._start_loading(r["worker"])
                self._wait_loaded()
            if "error" in r or r.get("missing_data"):
                logger.warning("daskml_scale.search: the best trial %d could not be trained again: %s", number,
                               r.get("error", "no worker has the data"))
                return
            state = r["state"]
        self.best = (number, value, state, best_epoch)

    # ------------------------------------------------------------------ cleaning up
    def _release(self) -> None:
        from distributed import fire_and_forget

        for w in list(self.loaded) + list(self._loading):
            try:
                fire_and_forget(self.client.submit(sw.drop_search, self.search_id, pure=False, workers=[w],
                                                   allow_other_workers=False))
            except Exception:  # noqa: BLE001  (cleaning up must not hide the search's own error)
                pass
        for f in list(self.sources) + list(self.val_sources or []) + list(self._loading.values()):
            try:
                f.release()
            except Exception:  # noqa: BLE001
                pass
