"""What runs on a worker for a pack: one epoch of several trials trained as one program.

A pack is trials whose built models share an architecture shape
(:func:`daskml_scale.search.stack.describe`). :func:`run_pack_epoch` is a task of (the
trials' parameters, the pack's state, epoch): on the first epoch it builds every
trial's model from the user's function exactly as a trial alone is built (its own seed),
so each trial starts from the weights it would have alone; it then trains every trial
one epoch over this worker's copy of the data, each on its own shuffle of the rows
(the shuffle a trial alone has), in one compiled program
(:class:`~daskml_scale.backend.tf_stacked.TrialStackTrainer`), validates, and returns each
trial's logs and the pack's new state (weights, optimizer slots, per-trial settings).

A trial whose loss is not finite, or whose model fails to build, comes back as an
error of its own; the others go on. The trainers are kept per architecture in a small
pool per worker process (one compiled program per pack size), so the next epoch, the
next pack of the same shape and the next search of that shape reuse it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from daskml_scale import backend
from daskml_scale.search import worker as sw
from daskml_scale.search.stack import describe
from daskml_scale.seeding import seeded
from daskml_scale.training.worker import _worker_address

__all__ = ["run_pack_epoch", "stack_settings", "slice_state"]

_POOLS = sw._PACK_TRAINERS  # idle trainers per search and architecture (at most 8 kept)
_POOL_LOCK = threading.Lock()


def stack_settings(settings: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-trial settings (one dict per trial) as the trainer's arrays: a vector per
    optimizer constant, ``dropout``/``l1``/``l2`` as ``(n, trials)``."""
    out: dict[str, np.ndarray] = {}
    for name in settings[0]:
        values = np.asarray([s[name] for s in settings], np.float32)
        out[name] = values.T if values.ndim == 2 else values
    return out


def slice_state(state: Mapping[str, Any], keep: Sequence[int]) -> dict[str, Any]:
    """The pack's state for the trials at positions ``keep`` only."""
    idx = np.asarray(list(keep), np.int64)
    return {"weights": [np.asarray(w)[idx] for w in state["weights"]],
            "slots": [[np.asarray(w)[idx] for w in slot] for slot in state["slots"]],
            "settings": [state["settings"][i] for i in keep]}


def _take_trainer(pool_key: str, stack: Any) -> Any:
    from daskml_scale.backend.tf_stacked import TrialStackTrainer

    with _POOL_LOCK:
        pool = _POOLS.get_or_create(pool_key, list)
        if pool:
            return pool.pop()
    return TrialStackTrainer(stack.spec, penalized=stack.penalized, jit_compile=_jit())


def _jit() -> bool:
    """XLA for the pack's epoch (``daskml_scale.search.stack-jit``, default on): it fuses a
    step's many small per-trial ops, at a compile per architecture and pack size."""
    from daskml_scale import config

    return bool(config.get("search.stack-jit", True))


def _padded(n: int) -> int:
    """Packs run at sizes 1, 2, 4, 8, ...: a pack that loses trials keeps its compiled program."""
    return 1 << max(0, (n - 1).bit_length())


def _pad(state: Mapping[str, Any], size: int) -> dict[str, Any]:
    """The pack's state with copies of its first trial up to ``size`` trials, at a learning rate
    of 0 (their weights do not move; their results are dropped)."""
    n = len(state["settings"])
    if size == n:
        return dict(state)
    extra = size - n
    idle = {**state["settings"][0], "learning_rate": 0.0}
    if "momentum" in idle:
        idle["momentum"] = 0.0

    def grow(a: Any) -> np.ndarray:
        a = np.asarray(a)
        return np.concatenate([a, np.repeat(a[:1], extra, axis=0)])

    return {"weights": [grow(w) for w in state["weights"]],
            "slots": None if state["slots"] is None else [[grow(w) for w in slot] for slot in state["slots"]],
            "settings": list(state["settings"]) + [idle] * extra}


def _give_back(pool_key: str, trainer: Any) -> None:
    with _POOL_LOCK:
        _POOLS.get_or_create(pool_key, list).append(trainer)


def _build(search_id: str, builder: Mapping[str, Any], style: str, params: Mapping[str, Any],
           context: Mapping[str, Any], seed: int, X: np.ndarray, y: np.ndarray, layout: Any) -> tuple[Any, Any]:
    """The trial's model with the initial weights :func:`~daskml_scale.search.worker.run_epoch`
    gives it (the same seed, then the build; its optimizer and metrics are not needed here)."""
    fn = sw._unpack_builder(f"{search_id}/builder", builder)
    with seeded(seed):
        model, hp = sw.call_builder(fn, style, params, context)
    sw.check_model(model)
    backend.set_input_layout(model, layout)
    if not model.built:
        model.build((None,) + tuple(X.shape[1:]))
    return model, hp


def _rows_plan(n: int, batch: int, orders: Sequence[np.ndarray]) -> np.ndarray:
    """``(steps, trials, batch)`` row numbers, ``-1`` past the last row of the last batch."""
    steps = max(1, math.ceil(n / batch))
    pad = steps * batch - n
    rows = np.stack([np.concatenate([o, np.full(pad, -1, o.dtype)]) if pad else o for o in orders])
    return np.ascontiguousarray(rows.reshape(len(orders), steps, batch).transpose(1, 0, 2).astype(np.int32))


def run_pack_epoch(
    search_id: str,
    key: str,
    builder: Mapping[str, Any],
    style: str,
    params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    context: Mapping[str, Any],
    state: Mapping[str, Any] | None,
    epoch: int,
    *,
    batch_size: int,
    layout: Any = None,
) -> dict[str, Any]:
    """Task: one epoch of every trial of a pack on this worker's copy of the data.

    Returns ``{"members": [...], "state": {weights, slots, settings}, "worker", "seconds",
    "build_s"}``: per trial (in the order given) ``{"logs": {loss, val_loss}, "declared"}`` or
    ``{"error", "traceback"}``; ``state`` holds the trials with logs only, in order.
    ``{"missing_data": True}`` on a worker without the search's data.
    """
    t0 = time.perf_counter()
    sw._quiet_retracing()
    worker = _worker_address()
    data = sw._DATA.get(search_id)
    if data is None:
        return {"missing_data": True, "worker": worker}
    X, y, Xv, yv = data["X"], data["y"], data["Xv"], data["yv"]
    members: list[dict[str, Any]] = [{} for _ in params]
    alive = list(range(len(params)))
    stack = None
    build_s = 0.0
    if state is None:  # the first epoch: every trial's own initial weights
        tb = time.perf_counter()
        weights: list[list[np.ndarray]] = []
        settings: list[dict[str, Any]] = []
        first = None
        for i, (p, seed) in enumerate(zip(params, seeds)):
            try:
                model, hp = _build(search_id, builder, style, p, context, int(seed), X, y, layout)
                stack, why = describe(model, layout)
                if stack is None or stack.key != key:
                    raise RuntimeError("build_model gave this trial a model of another shape on the worker than on "
                                       f"the driver ({why or 'a different architecture'}); make build_model depend "
                                       "on its parameters only")
            except Exception as exc:  # noqa: BLE001  (the user's code: this trial fails, its pack goes on)
                members[i] = sw._error(exc, worker, t0)
                continue
            first = first or stack
            weights.append(backend.get_weights(model))
            settings.append(stack.settings)
            if hp is not None:
                members[i]["declared"] = {n: q for n, q in hp.declared.items() if n not in p}
        alive = [i for i in alive if "error" not in members[i]]
        if not alive:
            return {"members": members, "state": None, "worker": worker, "seconds": time.perf_counter() - t0}
        state = {"weights": [np.stack(ws) for ws in zip(*weights)], "slots": None, "settings": settings}
        stack = first
        build_s = time.perf_counter() - tb
    # per search: a trainer reused by a later search of the same shape trained differently (0.5% off the
    # trial alone in the full test suite, equal alone); the compiled program is reused within a search
    pool_key = f"{search_id}/shape/{key}"
    if stack is None:
        with _POOL_LOCK:
            pool = _POOLS.get(pool_key)
            trainer = pool.pop() if pool else None
        if trainer is None:  # a worker new to this shape: the first trial's model tells the chain
            tb = time.perf_counter()
            model, _ = _build(search_id, builder, style, params[0], context, int(seeds[0]), X, y, layout)
            trainer = _take_trainer(pool_key, describe(model, layout)[0])
            build_s += time.perf_counter() - tb
    else:
        trainer = _take_trainer(pool_key, stack)
    n = len(alive)
    size = _padded(n) if trainer.jit_compile else n
    try:
        padded = _pad(state, size)
        trainer.set_state(padded["weights"], padded["slots"], stack_settings(padded["settings"]))
        orders = [np.random.default_rng([int(seeds[i]), 104729, epoch]).permutation(len(X)) for i in alive]
        idx = _rows_plan(len(X), batch_size, orders + orders[:1] * (size - n))
        sums = trainer.train_epoch(X, y, idx, np.full(idx.shape[0], size), np.full(size, idx.shape[0]), epoch)
        losses = sums[:n] / max(len(X), 1)
        val = None
        if len(Xv):
            vb = max(batch_size, 1024)
            v_idx = _rows_plan(len(Xv), vb, [np.arange(len(Xv))] * size)
            val = trainer.evaluate(Xv, yv, v_idx, np.full(v_idx.shape[0], size))[:n] / len(Xv)
        new_weights, new_slots = trainer.state()
        new_weights = [w[:n] for w in new_weights]
        new_slots = [[w[:n] for w in slot] for slot in new_slots]
    finally:
        _give_back(pool_key, trainer)
    kept: list[int] = []
    for j, i in enumerate(alive):
        loss = float(losses[j])
        if not math.isfinite(loss):
            members[i] = {**sw._error(FloatingPointError(
                f"the training loss is {loss} after epoch {epoch + 1}: the trial diverged"), worker, t0)}
            continue
        logs = {"loss": loss}
        if val is not None:
            logs["val_loss"] = float(val[j])
        members[i] = {**members[i], "logs": logs}
        kept.append(j)
    out_state = slice_state({"weights": new_weights, "slots": new_slots, "settings": state["settings"]}, kept) \
        if kept else None
    return {"members": members, "state": out_state, "worker": worker, "steps": int(idx.shape[0]),
            "build_s": build_s, "seconds": time.perf_counter() - t0}
