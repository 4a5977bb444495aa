"""ParameterServer step time against a local single-process step, sync and async.

    .venv/bin/python benchmarks/bench_parameter_server.py [--copies 8] [--epochs 3] [--batch 256]

Workload: the diamonds table (``--copies`` copies, 53,940 rows each, numeric +
one-hot features), MLP Dense(64)-Dense(64)-Dense(1), Adam(1e-3), batch 256.

* baseline: one process, the compiled multi-step train loop (``backend.make_train_fn``,
  one graph call over all the batches: the leanest Keras step there is) over the rows
  one worker holds; step time = time / batches.
* ours: ``fit(..., strategy=ParameterServer(mode, push_every=k))`` on a 2-worker
  LocalCluster (1 thread each); step time = wall time of an epoch's training (from
  ``on_epoch_begin`` to the end of its round: task submission, the actor's load and
  state copies and every push included, validation excluded) / batches per worker.
  The first epoch (model build and graph tracing on the workers) is not counted:
  the median of the later epochs is.

Ratios are printed against the baseline measured in the same run (targets: <= 2.0
at k=1, <= 1.15 at k >= 8), with the staleness the server saw (async) and the
number of optimizer steps it applied.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def build(n_features: int):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((n_features,)), keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ks", default="1,8,32")
    args = ap.parse_args()

    import dask.dataframe as dd
    import keras

    import daskml_scale
    from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform
    from daskml_scale import backend

    df = diamonds(copies=args.copies)
    pre = daskml_scale.Preprocessor(target="log_price", numeric=DIAMONDS_NUMERIC + ["volume"],
                                    categorical=DIAMONDS_CATEGORICAL, transform=diamonds_transform).fit(df)
    X, y = pre.transform(df)
    half = len(X) // 2
    print(f"{len(X):,} rows, {X.shape[1]} features, batch {args.batch}, "
          f"{int(np.ceil(half / args.batch))} batches per worker per epoch")

    # ---- baseline: one process, compiled loop over one worker's share of the rows
    model = build(X.shape[1])
    backend.ensure_built(model, X[:2], y[:2])
    train = backend.make_train_fn(model)
    train(X[: args.batch * 4], y[: args.batch * 4], args.batch)  # trace
    times = []
    for _ in range(3):
        t = time.perf_counter()
        steps = train(X[:half], y[:half], args.batch)
        times.append((time.perf_counter() - t) / steps)
    local = float(np.median(times))
    # ---- and the step of a plain Keras model.fit in one process (the usual baseline)
    fit_model = build(X.shape[1])
    fit_times = []
    for _ in range(3):
        t = time.perf_counter()
        fit_model.fit(X[:half], y[:half], batch_size=args.batch, epochs=1, verbose=0)
        fit_times.append((time.perf_counter() - t) / np.ceil(half / args.batch))
    fit_step = float(np.median(fit_times[1:]))
    print(f"local single-process step: compiled loop {local * 1e3:.3f} ms, model.fit {fit_step * 1e3:.3f} ms "
          f"(median of 3 epochs)\n")

    client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None, memory_limit="4GiB")
    client.wait_for_workers(2)
    ddf = dd.from_pandas(df, npartitions=8)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._t)

    print(f"{'mode':6} {'k':>3} {'step ms':>8} {'ratio':>6} {'vs fit':>6} {'target':>6} {'applied':>8} {'rejected':>8} "
          f"{'stale mean':>10} {'stale max':>9} {'loss':>8}")
    try:
        for mode in ("sync", "async"):
            for k in [int(v) for v in args.ks.split(",")]:
                timer = EpochTimer()
                h = daskml_scale.fit(
                    build(X.shape[1]), ddf, preprocessor=pre, epochs=args.epochs, batch_size=args.batch,
                    client=client, verbose=0, callbacks=[timer],
                    strategy=daskml_scale.ParameterServer(mode, push_every=k),
                )
                per_worker = max(
                    np.ceil(r / args.batch) for r in _stream_rows(h, len(X))
                )
                step = float(np.median(timer.times[1:])) / per_worker
                target = 2.0 if k == 1 else 1.15
                hh = h.history
                print(f"{mode:6} {k:>3} {step * 1e3:8.3f} {step / local:6.2f} {step / fit_step:6.2f} {target:6.2f} "
                      f"{hh['ps_applied'][-1]:8.0f} {hh['ps_rejected'][-1]:8.0f} "
                      f"{hh['ps_staleness_mean'][-1]:10.2f} {hh['ps_staleness_max'][-1]:9.0f} {hh['loss'][-1]:8.4f}")
    finally:
        client.close()


def _stream_rows(history, total: int) -> list[int]:
    """Rows per worker stream: the fit balances partitions by rows over 2 workers."""
    return [total // 2 + total % 2]


if __name__ == "__main__":
    main()
