"""The driver's units of work: a trial alone (:class:`_Run`) or a pack of trials trained
together as one stacked program (:class:`_Pack`), and how :class:`PackScheduling` forms,
sends and follows packs for :class:`~daskml_scale.search.driver.Search`.

With ``stack=True`` the driver asks Optuna for several trials at once (the trials left,
up to ``MAX_PACK`` per worker thread, for a sampler that draws each trial independently,
such as random search; four per worker thread for the others, so that TPE still learns
from finished trials),
builds each trial's model on the driver and groups the trials whose models
:func:`~daskml_scale.search.stack.describe` finds of one shape: a group of at least
``daskml_scale.search.stack-min-trials`` (default ``MIN_PACK``, 4) is a pack (at most
``MAX_PACK`` trials), the others run alone as without stacking (a pack's compiled program
costs about what tracing three trials alone does). A pack takes one worker thread, so a
large group is cut into up to one pack per thread. A pack
takes one worker thread. After each of its epochs, every trial reports its own
objective to Optuna; a pruned, finished or failed trial leaves the pack and the others go
on. The best epoch's weights of every trial are kept from the pack (without the
optimizer state, which the stacked program holds in its own layout).
"""

from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daskml_scale import config
from daskml_scale._utils import waits
from daskml_scale.search import pack_worker as pw
from daskml_scale.search import worker as sw
from daskml_scale.search.stack import describe

logger = logging.getLogger(__name__)

__all__ = ["_Run", "_Pack", "PackScheduling", "MAX_PACK", "MIN_PACK", "trial_seed"]

MAX_PACK = 16
MIN_PACK = 4  # fewer trials of a shape train alone: a pack's compile costs about what tracing 3 trials does
_AHEAD_PER_THREAD = 4
_MISSING_DATA_RETRIES = 3


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``: its initial weights and its shuffles."""
    return int((seed * 1_000_003 + number * 7919 + 17) % (2**31 - 1))


@dataclass
class _Run:
    """A trial in flight."""

    trial: Any
    params: dict[str, Any]
    started: float
    epoch: int = 0
    state: Any = None
    history: dict[str, list[float]] = field(default_factory=dict)
    values: list[float] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: Any = None
    workers: list[str] = field(default_factory=list)
    compute_s: float = 0.0
    build_s: float = 0.0
    retries: int = 0
    future: Any = None
    pack: int | None = None  # the pack it trains in, if any
    pack_size: int = 0

    @property
    def label(self) -> str:
        return f"trial {self.trial.number}"


@dataclass
class _Pack:
    """Trials of one architecture shape trained together, epoch by epoch."""

    number: int
    key: str
    members: list[_Run]
    state: Any = None
    epoch: int = 0
    retries: int = 0
    future: Any = None

    @property
    def label(self) -> str:
        return f"pack {self.number} (trials {[r.trial.number for r in self.members]})"


class PackScheduling:
    """The part of :class:`~daskml_scale.search.driver.Search` that forms and runs packs."""

    # set by Search.__init__ (with the search's other attributes used here)
    stack: bool
    stack_reasons: dict[str, int]
    _pending: list[Any]
    _packs_made: int

    # ------------------------------------------------------------------ asking
    def _new_run(self) -> _Run:
        trial = self.study.ask(fixed_distributions=self._distributions())
        fixed = {n: p.default for n, p in self.space.items() if p.distribution is None}
        for n, v in fixed.items():
            trial.set_user_attr(f"fixed_{n}", v)
        return _Run(trial=trial, params={**fixed, **trial.params}, started=time.perf_counter())

    def _ahead(self, to_start: int) -> int:
        """How many trials to ask for at once."""
        import optuna

        if not self.stack:
            return 1
        if isinstance(self.study.sampler, (optuna.samplers.RandomSampler, optuna.samplers.GridSampler,
                                           optuna.samplers.BruteForceSampler)):
            return min(to_start, MAX_PACK * self._concurrency())  # a full pack per thread at most
        return max(1, _AHEAD_PER_THREAD * self._concurrency())

    def _stack_key(self, params: dict[str, Any]) -> str | None:
        """The trial's model built on the driver, and the shape it shares (``None``: it trains alone)."""
        if self.layout:
            stack, why = None, "the model has named inputs"
        else:
            try:
                model, _ = sw.call_builder(self.build_model, self.style, params, self.context)
                sw.check_model(model)
                if not model.built:  # the weights' shapes are all it needs (no optimizer, no metrics)
                    model.build((None,) + tuple(self.sample[0].shape[1:]))
                stack, why = describe(model, self.layout)
            except Exception as exc:  # noqa: BLE001  (the trial runs alone, which records its error)
                stack, why = None, f"build_model failed ({type(exc).__name__})"
        if stack is None:
            self.stack_reasons[why] = self.stack_reasons.get(why, 0) + 1
            return None
        return stack.key

    def _ask_units(self, to_start: int) -> int:
        """Ask Optuna for the next trials and queue them as packs and trials alone.
        Returns how many trials were asked."""
        runs: list[_Run] = []
        for _ in range(min(to_start, self._ahead(to_start))):
            runs.append(self._new_run())
        if not self.stack or len(runs) < 2:
            self._pending.extend(runs)
            return len(runs)
        shapes: dict[str, list[_Run]] = {}
        for run in runs:
            key = self._stack_key(run.params)
            if key is None:
                self._pending.append(run)
            else:
                shapes.setdefault(key, []).append(run)
        least = max(2, int(config.get("search.stack-min-trials", MIN_PACK)))
        threads = self._concurrency()
        for key, group in shapes.items():
            # a pack takes one thread: a big group is cut into one pack per thread (packs of >= least trials)
            n_packs = max(1, -(-len(group) // MAX_PACK), min(threads, len(group) // least))
            for i in range(n_packs):
                chunk = group[i::n_packs]  # packs of even sizes
                if len(chunk) < least:
                    why = f"fewer than {least} trials of its shape asked together"
                    self.stack_reasons[why] = self.stack_reasons.get(why, 0) + len(chunk)
                    self._pending.extend(chunk)
                    continue
                pack = _Pack(number=self._packs_made, key=key, members=chunk)
                self._packs_made += 1
                for r in chunk:
                    r.pack, r.pack_size = pack.number, len(chunk)
                self._pending.append(pack)
        return len(runs)

    @staticmethod
    def trials_in(running: dict[str, Any]) -> int:
        """Trials in flight (a pack counts its trials)."""
        return sum(len(u.members) if isinstance(u, _Pack) else 1 for u in running.values())

    def stacking_summary(self) -> dict[str, Any]:
        return {"enabled": self.stack, "packs": self._packs_made, "not_stacked": dict(self.stack_reasons)}

    # ------------------------------------------------------------------ a pack's epochs
    def _submit_pack(self, pack: _Pack, done: "queue.SimpleQueue[Any]", running: dict[str, Any]) -> None:
        if pack.epoch == 0:
            for r in pack.members:
                r.started = time.perf_counter()
        fut = self.client.submit(
            pw.run_pack_epoch, self.search_id, pack.key, self.builder, self.style,
            [r.params for r in pack.members], [trial_seed(self.seed, r.trial.number) for r in pack.members],
            self.context, pack.state, pack.epoch, batch_size=self.batch_size, layout=self.layout,
            pure=False, workers=sorted(self.loaded) or None, allow_other_workers=True,
            key=f"daskml-search-{self.search_id}-p{pack.number}-e{pack.epoch}-{uuid.uuid4().hex[:6]}",
        )
        pack.future = fut
        running[fut.key] = pack
        fut.add_done_callback(done.put)

    @staticmethod
    def _outcome(fut: Any) -> tuple[dict[str, Any] | None, str | None]:
        """A done epoch task's result, or why it has none; the future is released."""
        if fut.status != "finished":
            why = fut.exception(timeout=waits.wait_timeout()) if fut.status == "error" else "the task was cancelled"
            fut.release()
            return None, f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else str(why)
        r = fut.result(timeout=waits.wait_timeout())
        fut.release()
        return r, None

    def _missing_data(self, holder: Any, r: dict[str, Any], resubmit: Any, fail: Any) -> bool:
        """True when the task's worker did not have the search's data: it is loaded there
        again and the task resubmitted, or, after ``_MISSING_DATA_RETRIES``, ``fail(why)``."""
        if not r.get("missing_data"):
            return False
        holder.retries += 1
        if holder.retries > _MISSING_DATA_RETRIES:
            fail(f"the worker {r.get('worker')} could not get the search's data")
            return True
        self.loaded.pop(r.get("worker"), None)
        if r.get("worker"):
            self._start_loading(r["worker"])
        resubmit()
        return True

    def _end_epoch(self, run: _Run, value: float) -> bool:
        """Report the epoch's objective; the trial completes, is pruned, or (True) goes on."""
        run.trial.report(value, run.epoch + 1)
        run.epoch += 1
        if run.epoch >= self.epochs:
            self._finish(run, "complete")
        elif run.trial.should_prune():
            self._finish(run, "pruned")
        else:
            return True
        return False

    def _handle_pack(self, pack: _Pack, fut: Any, done: "queue.SimpleQueue[Any]", running: dict[str, Any]) -> None:
        """One epoch of a pack: each trial reports, then is pruned, finishes, fails or goes on."""
        def fail_all(why: str) -> None:
            for run in pack.members:
                self._fail(run, why)

        r, error = self._outcome(fut)
        if r is None:
            fail_all(error or "")
            return
        if self._missing_data(pack, r, lambda: self._submit_pack(pack, done, running), fail_all):
            return
        share = 1.0 / len(pack.members)
        going_on: list[tuple[_Run, int]] = []
        position = 0  # in the returned state: the trials that trained this epoch
        for run, m in zip(pack.members, r["members"]):
            if r.get("worker") and (not run.workers or run.workers[-1] != r["worker"]):
                run.workers.append(r["worker"])
            run.compute_s += float(r.get("seconds", 0.0)) * share
            run.build_s += float(r.get("build_s", 0.0)) * share
            if "error" in m:
                logger.info("daskml_scale.search: trial %d (pack %d) failed: %s\n%s", run.trial.number, pack.number,
                            m["error"], m.get("traceback"))
                self._fail(run, m["error"])
                continue
            pos, position = position, position + 1
            for name, param in (m.get("declared") or {}).items():
                if name not in self.space:
                    self.space[name] = param
                    run.params.setdefault(name, param.default)
            for k, v in m["logs"].items():
                run.history.setdefault(k, []).append(float(v))
            value = m["logs"].get(self.objective)
            if value is None or not math.isfinite(value):
                self._fail(run, f"the objective {self.objective!r} is {value} after epoch {run.epoch + 1}")
                continue
            run.values.append(float(value))
            if self._better(value, run.best_value):
                weights = [np.array(w[pos]) for w in r["state"]["weights"]]
                run.best_value, run.best_epoch = float(value), run.epoch
                run.best_state = {"weights": weights, "optimizer": None}
            if self._end_epoch(run, float(value)):
                going_on.append((run, pos))
        if going_on:
            pack.members = [run for run, _ in going_on]
            pack.state = pw.slice_state(r["state"], [pos for _, pos in going_on])
            pack.epoch += 1
            self._submit_pack(pack, done, running)
