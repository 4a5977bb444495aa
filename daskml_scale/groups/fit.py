"""The driver of :func:`fit_groups`: one Keras model per group, trained on the workers.

The data path: the Preprocessor's statistics are global (fitted in one pass, as for
:func:`daskml_scale.fit`); every row gets its place in the input; Dask's shuffle
(``ddf.shuffle(on=by)``) brings each group's rows into one partition; one task per
partition trains all its groups (:mod:`daskml_scale.groups.worker`) and sends back
weights and history only. The fallback model, trained on every row with
:func:`daskml_scale.fit`, runs on the cluster at the same time.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from daskml_scale import backend, config
from daskml_scale._utils import waits
from daskml_scale._utils.client import default_client
from daskml_scale.exceptions import ArgumentError, DataError, MissingColumnError
from daskml_scale.groups.large import large_groups, max_group_rows_from, split_large, train_large
from daskml_scale.groups.models import GroupModels, history_frame
from daskml_scale.groups.spec import stack_plan
from daskml_scale.groups.worker import ROW_KEY, GroupTask, add_row_key, stack_results, train_partition
from daskml_scale.seeding import seeded

__all__ = ["fit_groups", "build_template"]

_MODES = ("auto", "stacked", "loop")
_FALLBACKS = ("global", None)


def build_template(build_model: Callable[[int], Any], n_features: int, seed: int, preprocessor: Any) -> Any:
    """``build_model(n_features)`` under ``seed``, checked and built (every group starts from its weights)."""
    with seeded(seed):  # equal templates under one seed, whatever the process's other threads draw
        model = build_model(n_features)
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise ArgumentError(
            "Expected build_model(n_features) to return a compiled Keras model. Received: a model without an "
            "optimizer; call model.compile(optimizer=..., loss=...) inside build_model"
        )
    classes = getattr(preprocessor, "classes_", None)
    y = np.zeros(2, np.int64 if classes else np.float32)
    backend.ensure_built(model, np.zeros((2, n_features), np.float32), y)
    return model


def fit_groups(
    build_model: Callable[[int], Any],
    data: Any,
    *,
    by: str | Sequence[str],
    preprocessor: Any,
    epochs: int = 1,
    batch_size: int | None = None,
    validation_fraction: float | None = None,
    min_rows: int = 10,
    fallback: str | None = "global",
    fallback_epochs: int | None = None,
    client: Any = None,
    seed: int | None = None,
    shuffle: bool = True,
    mode: str = "auto",
    npartitions: int | None = None,
    per_group_scaling: bool = False,
    max_group_rows: int | str | None = None,
) -> GroupModels:
    """Train one Keras model per group of rows, all groups of a worker together.

    Parameters
    ----------
    build_model : callable
        ``build_model(n_features)`` returns one compiled Keras model: the architecture
        every group shares. It is called once, under ``seed``; every group starts from
        its weights.
    data : dask.dataframe.DataFrame or pandas.DataFrame
        Raw training rows. No row travels to the client.
    by : str or list of str
        The group column(s) of the raw rows. Rows with a missing value there belong to
        no group (the fallback model still trains on them).
    preprocessor : Preprocessor
        With a target; fitted on ``data`` first (one pass) when it is not. Its
        statistics are global: every group's features are scaled alike.
    epochs, batch_size : int
        As in ``model.fit``, per group; ``batch_size`` defaults to
        ``daskml_scale.training.batch-size``.
    validation_fraction : float, optional
        Hold out this fraction of every group's rows (deterministic per group and seed).
    min_rows : int
        Groups with fewer rows (after the transform) get no model of their own.
    fallback : {"global", None}
        ``"global"``: also train one model on all rows (:func:`daskml_scale.fit`),
        used for groups without a model. ``None``: such rows get empty predictions
        with a reason.
    fallback_epochs : int, optional
        Epochs of the fallback model (default: ``epochs``).
    client : distributed.Client, optional
        Defaults to the current client.
    seed : int, optional
        Seeds the initial weights, every group's held-out rows and batch order.
    shuffle : bool
        Shuffle every group's rows each epoch (``False``: input order).
    mode : {"auto", "stacked", "loop"}
        ``"stacked"``: a worker's groups train as one compiled program (the
        architectures :mod:`daskml_scale.groups.spec` lists); ``"loop"``: one traced
        train step reused group after group; ``"auto"``: stacked when it can.
    npartitions : int, optional
        Partitions after the shuffle (default: as many as ``data`` has, at least one
        per worker); each is one task.
    per_group_scaling : bool
        Standardize every group's numeric features with the mean and scale of the
        group's own training rows (computed on the worker after the shuffle, stored
        in the bundle, applied at prediction) instead of the global ones. Rows of
        groups without a model (the fallback's) keep the global statistics.
        ``model_for(key)`` then expects features scaled with the group's statistics
        (:meth:`GroupModels.transform_for`).
    max_group_rows : int, "off" or None
        A group with more raw rows than this is not shuffled into one partition: it is
        trained with :func:`daskml_scale.fit` over its rows where they are, streamed
        partition by partition (:mod:`daskml_scale.groups.large`). Finding such groups
        costs one pass over the ``by`` columns. ``None``: the configuration's
        ``daskml_scale.groups.max-group-rows`` (1,000,000); ``"off"``: no pass, every
        group is shuffled.

    Returns
    -------
    GroupModels

    Raises
    ------
    ArgumentError
        An argument is invalid, or ``mode="stacked"`` with an architecture that cannot
        be stacked (the message names the layer, loss or optimizer).
    MissingColumnError
        A ``by`` column or the target is missing.
    DataError
        No group has ``min_rows`` rows and there is no fallback.

    Examples
    --------
    >>> models = fit_groups(build_model, ddf, by="tailnum", preprocessor=pre, epochs=5)  # doctest: +SKIP
    >>> models.history_.groupby("epoch")["val_loss"].mean()  # doctest: +SKIP
    >>> save_bundle(models, pre, "per-aircraft.bundle")  # doctest: +SKIP
    """
    import dask
    import dask.dataframe as dd

    t0 = time.perf_counter()
    by = [by] if isinstance(by, str) else list(by)
    if not by:
        raise ArgumentError("Expected by= to name at least one group column. Received: by=[]")
    if mode not in _MODES:
        raise ArgumentError(f"Expected mode to be one of {_MODES}. Received: mode={mode!r}")
    if fallback not in _FALLBACKS:
        raise ArgumentError(f"Expected fallback to be 'global' or None. Received: fallback={fallback!r}")
    if epochs < 1:
        raise ArgumentError(f"Expected epochs >= 1. Received: epochs={epochs}")
    if preprocessor is None or preprocessor.target is None:
        raise ArgumentError("Expected a Preprocessor with a target (preprocessor=Preprocessor(target=..., ...))")
    if int(min_rows) < 1:
        raise ArgumentError(f"Expected min_rows >= 1. Received: min_rows={min_rows}")
    overlap = [c for c in by if c in (preprocessor.target,)]
    if overlap:
        raise ArgumentError(f"The group column {overlap[0]!r} cannot be the target")
    batch_size = int(batch_size or config.get("training.batch-size", 256))
    seed = int(seed if seed is not None else config.get("training.seed", 0))
    validation_fraction = float(validation_fraction or 0.0)
    if not 0.0 <= validation_fraction < 1.0:
        raise ArgumentError(f"Expected 0 <= validation_fraction < 1. Received: {validation_fraction}")
    client = default_client(client, purpose="fit_groups()")
    n_workers = max(1, len(client.nthreads()))
    if isinstance(data, pd.DataFrame):
        data = dd.from_pandas(data, npartitions=n_workers)
    missing = [c for c in by if c not in data.columns]
    if missing:
        raise MissingColumnError(
            f"The group column {missing[0]!r} is missing: the data has columns {list(data.columns)}", column=missing[0]
        )
    if not hasattr(preprocessor, "feature_names_"):
        preprocessor.fit(data, client=client)
    timings: dict[str, float] = {"preprocessor_s": time.perf_counter() - t0}
    limit = max_group_rows_from(max_group_rows)
    large = large_groups(data, by, limit) if limit is not None else {}
    if large and per_group_scaling:
        raise ArgumentError(
            f"per_group_scaling=True with groups over max_group_rows={limit} rows ({len(large)}, e.g. "
            f"{next(iter(large))}) is not built: raise max_group_rows, or leave per_group_scaling off")
    rest, large_frames = split_large(data, by, large) if large else (data, {})
    timings["count_s"] = time.perf_counter() - t0 - timings["preprocessor_s"]

    # the architecture, once
    from daskml_scale.custom_objects import ship_model

    template = build_template(build_model, preprocessor.n_features_, seed, preprocessor)
    spec, why = stack_plan(template)
    if mode == "stacked" and spec is None:
        raise ArgumentError(f"Expected a stackable architecture for mode='stacked'. Received: {why}; use mode='loop'")
    run_mode = "loop" if mode == "loop" or spec is None else "stacked"
    initial = backend.get_weights(template)

    def fresh() -> Any:
        """A new model (its own optimizer) from the template's starting weights."""
        model = build_template(build_model, preprocessor.n_features_, seed, preprocessor)
        backend.set_weights(model, initial)
        return model

    template_bytes = ship_model(template, backend.model_to_bytes(template))
    fit_id = f"groups-{uuid.uuid4().hex[:8]}"
    task = GroupTask(
        fit_id=fit_id, by=by, preprocessor=preprocessor, epochs=int(epochs), batch_size=batch_size,
        validation_fraction=validation_fraction, min_rows=int(min_rows), seed=seed, shuffle=bool(shuffle),
        mode=run_mode, initial_weights=initial, per_group_scaling=bool(per_group_scaling),
    )

    # rows to their group's partition; one task per partition
    meta = data._meta.assign(**{ROW_KEY: np.zeros(0, np.int64)})
    keyed = rest.map_partitions(add_row_key, meta=meta)
    n_out = int(npartitions or max(data.npartitions, n_workers))
    shuffled = keyed.shuffle(on=by, npartitions=n_out)
    model_future = client.submit(_identity, template_bytes, pure=False, key=f"daskml-groups-model-{fit_id}")
    tasks = [
        dask.delayed(train_partition, pure=False)(part, model_future, task, dask_key_name=f"{fit_id}-train-{i}")
        for i, part in enumerate(shuffled.to_delayed())
    ]
    futures = client.compute(tasks)
    fallback_model, fallback_history = None, None
    try:
        if fallback == "global":
            from daskml_scale.training import fit

            tf = time.perf_counter()
            fallback_model = fresh()
            fallback_history = fit(
                fallback_model, data, preprocessor=preprocessor, epochs=int(fallback_epochs or epochs),
                batch_size=batch_size, validation_fraction=validation_fraction or None, client=client, seed=seed,
                verbose=0,
            )
            timings["fallback_s"] = time.perf_counter() - tf
        if large_frames:
            tl = time.perf_counter()
            large_results = train_large(
                large_frames, fresh,
                preprocessor=preprocessor, epochs=epochs, batch_size=batch_size,
                validation_fraction=validation_fraction, client=client, seed=seed)
            timings["large_s"] = time.perf_counter() - tl
        results = _gather(client, futures) + (large_results if large_frames else [])
    finally:
        for f in [*futures, model_future]:
            f.release()
    timings["total_s"] = time.perf_counter() - t0
    return _assemble(results, by, template, template_bytes, initial, run_mode, int(min_rows), fallback_model,
                     fallback_history, timings, why, epochs, batch_size, validation_fraction, seed,
                     scaling_of=preprocessor if per_group_scaling else None)


def _gather(client: Any, futures: list[Any]) -> list[dict[str, Any]]:
    """Every task's result, in task order; a bounded wait (no progress for
    ``daskml_scale.predict.wait-timeout`` seconds fails naming the workers)."""
    import queue

    timeout = waits.wait_timeout()
    try:
        for _ in waits.completed(futures, timeout):
            pass
    except queue.Empty:
        left = {f: f.key for f in futures if not f.done()}
        raise waits.stalled_error(client, left, timeout, "fit_groups: no partition",
                                  "A worker may be stuck: see its log, or raise daskml_scale.predict.wait-timeout.")
    return [waits.result(f, timeout=timeout, what="fit_groups") for f in futures]


def _assemble(results: list[dict[str, Any]], by: list[str], template: Any, template_bytes: bytes,
              initial: list[np.ndarray], mode: str, min_rows: int, fallback_model: Any, fallback_history: Any,
              timings: dict[str, float], why: str, epochs: int, batch_size: int, validation_fraction: float,
              seed: int, scaling_of: Any = None) -> GroupModels:
    merged = stack_results(results)
    keys = [tuple(plan_key) for plan_key in (_parse(k) for k in merged["keys"])]
    if len(set(keys)) != len(keys):  # pragma: no cover - the shuffle puts a group in one partition
        raise DataError("A group was trained in two partitions: the shuffle did not keep groups whole")
    order = np.argsort(np.array(merged["keys"], dtype=object), kind="stable") if keys else np.zeros(0, np.int64)
    keys = [keys[i] for i in order]
    weights = [w[order] for w in merged["weights"]] if keys else [np.zeros((0, *np.shape(w)), np.float32) for w in initial]
    e = int(epochs)
    loss = merged["loss"][order] if keys else np.zeros((0, e))
    val = merged["val_loss"][order] if keys else np.zeros((0, e))
    rows = merged["rows"][order] if keys else np.zeros(0, np.int64)
    val_rows = merged["val_rows"][order] if keys else np.zeros(0, np.int64)
    small = {tuple(_parse(k)): n for k, n in merged["small"].items()}
    scaling = None
    if scaling_of is not None:
        from daskml_scale.groups.scaling import GroupScaling

        k = len(scaling_of.numeric)
        means, scales = merged["scaling"] if merged["scaling"] is not None else (np.zeros((0, k)), np.ones((0, k)))
        scaling = GroupScaling.of(scaling_of, means[order] if keys else means, scales[order] if keys else scales)
    if not keys and fallback_model is None:
        raise DataError(
            f"Expected at least one group with min_rows={min_rows} rows. Received: {len(small)} groups, the largest "
            f"with {max(small.values(), default=0)} rows; lower min_rows or use fallback='global'"
        )
    summary = {
        "epochs": e, "batch_size": batch_size, "validation_fraction": validation_fraction, "seed": seed,
        "train_rows": int(rows.sum()), "validation_rows": int(val_rows.sum()), "partitions": sum(1 for r in results if not r.get("large")),
        "small_group_rows": int(sum(small.values())), "timings": {k: round(v, 4) for k, v in timings.items()},
        "worker_train_s": round(float(sum(r["timings"]["train_s"] for r in results)), 4),
        "stacking": "stacked" if mode == "stacked" else f"loop ({why or 'asked for'})",
        "per_group_scaling": scaling_of is not None,
        "large_groups": int(sum(1 for r in results if r.get("large"))),
    }
    if fallback_history is not None:
        summary["fallback"] = {k: float(v[-1]) for k, v in fallback_history.history.items() if v}
    return GroupModels(
        by=by, keys=keys, weights=weights, template_bytes=template_bytes,
        history=history_frame(keys, loss, val, rows, val_rows), small=small, fallback=fallback_model, mode=mode,
        min_rows=min_rows, initial_weights=initial, rows=rows.tolist(), summary=summary, template=template,
        scaling=scaling,
    )


def _parse(key_json: str) -> tuple:
    import json

    return tuple(json.loads(key_json))


def _identity(value: Any) -> Any:
    return value

