"""Wide categoricals benchmark: flights with ``dest`` and ``tailnum`` as categoricals.

One-hot, those two columns give ~4,100 float features per row (the dense block is
rows x categories). With ``categorical_encoding="int"`` each is ONE code column
feeding an ``Embedding`` (a model with named inputs, built by
``daskml_scale.model_inputs``): memory per row is O(columns).

Workload: the public NYC flights 2013 table (336,776 rows), target ``arr_delay``, 9
numeric features, ``carrier`` and ``origin`` one-hot, ``dest`` and ``tailnum`` as
integer codes with embeddings of 4 and 8; Dense(64)-Dense(64)-Dense(1), Adam(1e-3),
batch 256, 10% of the rows held out.

The baseline is the best script one process can run **on the same encoding**:
``model.fit`` on the named inputs in memory (a dict of NumPy arrays), with
``steps_per_execution`` tuned (1, 32, 128; the best median is kept), in a fresh
process per round. Its ``TARGET_EPOCHS``-epoch validation loss is the target.

Comparisons
  * ``memory``: bytes of ``X`` per row, one-hot against integer codes (facts);
  * ``tuning``: the baseline's ``steps_per_execution``;
  * ``target``: time to the baseline's validation loss: the baseline against
    ``daskml_scale.fit`` (default strategy and ModelAveraging, 2 workers x 1 thread),
    ours timed from the ``fit`` call with the raw rows persisted on the workers. ``fit``'s
    ``batch_size`` is per worker: each strategy runs at ``BATCH`` per worker (a global
    batch of 512 rows a step) and, as ``-global``, at ``BATCH // 2`` per worker (the single
    process's global batch of 256; the headline).

Run:  .venv/bin/python benchmarks/bench_wide.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import daskml_scale  # noqa: E402
import bench_training as training_bench  # noqa: E402  (the baseline and time-to-target, shared)
from _method import Benchmark, Ratio, Variant, add_arguments  # noqa: E402
from daskml_scale import backend  # noqa: E402
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform  # noqa: E402

BATCH = 256
TARGET_EPOCHS = 6
SPE = (1, 32, 128)
WIDE = ["dest", "tailnum"]
DIMS = {"dest": 4, "tailnum": 8}

WORKERS = 2
#: name -> (the strategy, rows per worker's batch). ``BATCH`` per worker makes a global batch of
#: ``WORKERS * BATCH``; ``BATCH // WORKERS`` per worker keeps the single process's global batch
#: (each worker takes as many steps per epoch as the single process does)
STRATEGIES = {
    "default": (lambda: None, BATCH),
    "averaging": (lambda: daskml_scale.ModelAveraging(), BATCH),
    "default-global": (lambda: None, BATCH // WORKERS),
    "averaging-global": (lambda: daskml_scale.ModelAveraging(), BATCH // WORKERS),
}


def preprocessor(encoding: str) -> daskml_scale.Preprocessor:
    coded = {c: encoding for c in WIDE}
    return daskml_scale.Preprocessor(
        target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=[*FLIGHTS_CATEGORICAL, *WIDE],
        transform=flights_transform, categorical_encoding=coded, max_categories=10_000,
    )


def build(pre, k: int = 1, seed: int = 0):
    import keras

    with daskml_scale.seeded(seed):
        inputs, features = daskml_scale.model_inputs(pre, embedding_dims=DIMS)
        h = keras.layers.Dense(64, activation="relu")(features)
        h = keras.layers.Dense(64, activation="relu")(h)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"], steps_per_execution=k)
    return model


class Data:
    def __init__(self, quick: bool) -> None:
        table = flights()
        if quick:
            table = table.iloc[: len(table) // 4]
        is_val = np.random.default_rng(0).random(len(table)) < 0.1
        self.train, self.val = table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)
        self.pre = preprocessor("int").fit(self.train)
        X, self.y = self.pre.transform(self.train)
        Xv, self.yv = self.pre.transform(self.val)
        from daskml_scale.encoding import input_layout

        slots = input_layout(self.pre)
        self.X = backend.split_inputs(slots, X)  # the single-process script holds its inputs as a dict
        self.Xv = backend.split_inputs(slots, Xv)
        self.bytes_per_row = X.nbytes / len(X)


def single_fit(data: Data, k: int, epochs: int, target: float | None = None) -> dict:
    """The baseline script (bench_training's), with this benchmark's model on the named inputs."""
    return training_bench.single_fit(data, k, epochs, target, make=lambda d, k: build(d.pre, k))


def single_fit_fresh(k: int, epochs: int, target: float, quick: bool) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--single-child", json.dumps([k, epochs, target, quick])],
        check=True, capture_output=True, text=True, timeout=900,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def ours_fit(client, ddf, vddf, data: Data, strategy, target: float, max_epochs: int, batch_size: int) -> dict:
    return training_bench.ours_fit(client, ddf, vddf, data, strategy, target, max_epochs, make=lambda d: build(d.pre),
                                   batch_size=batch_size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-epochs", type=int, default=18)
    ap.add_argument("--single-child", help=argparse.SUPPRESS)
    add_arguments(ap)
    args = ap.parse_args()
    if args.single_child:
        k, epochs, target, quick = json.loads(args.single_child)
        print(json.dumps(single_fit(Data(quick), k, epochs, target)))
        return 0
    bench = Benchmark.from_args("wide", args, description="wide categoricals: integer codes + embeddings, fit vs the best single process")
    data = Data(args.quick)
    one_hot = preprocessor("one_hot").fit(data.train)
    bench.fact("train_rows", len(data.y))
    bench.fact("validation_rows", len(data.yv))
    bench.fact("one_hot_features", one_hot.n_features_)
    bench.fact("one_hot_bytes_per_row", 4 * one_hot.n_features_)
    bench.fact("int_features", data.pre.n_features_)
    bench.fact("int_bytes_per_row", data.bytes_per_row)
    bench.fact("vocabulary_sizes", data.pre.vocabulary_sizes_)
    print(f"X per row: one-hot {4 * one_hot.n_features_} bytes ({one_hot.n_features_} features), "
          f"integer codes {data.bytes_per_row:.0f} bytes ({data.pre.n_features_} columns)", flush=True)
    target_epochs = 2 if args.quick else TARGET_EPOCHS

    tuning = bench.compare(
        "tuning", "model.fit on the named inputs, 2 epochs, by steps_per_execution (the baseline is the best)",
        [Variant(f"spe-{k}", lambda k=k: single_fit(data, k, 2), f"model.fit, steps_per_execution={k}",
                 {"steps_per_execution": k, "epochs": 2, "batch_size": BATCH, "data": "dict of NumPy arrays in memory"})
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

    import dask.dataframe as dd

    client = daskml_scale.connect(n_workers=WORKERS, threads_per_worker=1, dashboard_address=None)
    try:
        client.run(lambda: __import__("tensorflow").constant(1))
        ddf = dd.from_pandas(data.train, npartitions=8).persist()
        vddf = dd.from_pandas(data.val, npartitions=2).persist()
        variants = [Variant("single", lambda: single_fit_fresh(best_k, target_epochs, target, args.quick),
                            f"model.fit on named inputs, steps_per_execution={best_k}, a fresh process",
                            {"steps_per_execution": best_k, "batch_size": BATCH, "epochs": target_epochs,
                             "encoding": "integer codes + embeddings (the same model)",
                             "timed_from": "the model.fit call, arrays in memory"})]
        for name, (make, batch) in STRATEGIES.items():
            described = (make() or daskml_scale.training.default_strategy()).describe()
            variants.append(Variant(
                name, lambda make=make, batch=batch: ours_fit(client, ddf, vddf, data, make(), target, args.max_epochs, batch),
                f"daskml_scale.fit, batch_size={batch} per worker, {described}",
                {**described, "workers": WORKERS, "threads_per_worker": 1, "batch_size_per_worker": batch,
                 "global_batch": batch * WORKERS, "timed_from": "the fit call, raw data persisted"}))

        def label(n: str) -> str:
            batch = STRATEGIES[n][1]
            return (f"{n} (batch {batch} per worker, global {batch * WORKERS}) vs model.fit "
                    f"(batch {BATCH}, steps_per_execution={best_k}), same encoding")

        bench.compare(
            "target", f"time to the best single-process script's {target_epochs}-epoch validation loss, same encoding",
            variants, show=["epochs"],
            ratios=[Ratio(n, "single", label(n), target=">= 1.3x", headline=n == "default-global") for n in STRATEGIES],
            notes=[f"'-global' sides keep the single process's global batch ({BATCH} rows a step: {BATCH // WORKERS} "
                   f"on each of {WORKERS} workers); the others take {BATCH} rows per worker, {BATCH * WORKERS} a step"],
        )
    finally:
        client.close()
    bench.write()
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
