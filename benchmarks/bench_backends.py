"""Keras backends benchmark: TensorFlow against JAX in one run, each against the best
single-process ``model.fit`` on the same backend.

Every figure is one training step (batch 256 per worker) of the training benchmark's
workload (flights, 28 features, Dense(64)-Dense(64)-Dense(1), Adam), measured in a
fresh process with ``KERAS_BACKEND`` set, so that the two backends never share one:

* ``local``: the compiled local loop (``backend.make_train_fn``), one process;
* ``fit``: ``model.fit`` on arrays in memory, ``steps_per_execution=128`` (the best on
  both backends in the training benchmark's tuning);
* ``allreduce``: ``AllReduce(every=1)`` on 2 workers (gradient, ring reduce, apply):
  the second epoch's wall time over each worker's steps (no validation);
* ``ps``: ``ParameterServer("sync", push_every=1)`` on 2 workers, likewise.

Run:  .venv/bin/python benchmarks/bench_backends.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BACKENDS = ("tensorflow", "jax")
WHAT = {
    "local": "the compiled local loop, one process",
    "fit": "model.fit, steps_per_execution=128, one process",
    "allreduce": "AllReduce(every=1), 2 workers",
    "ps": "ParameterServer('sync', push_every=1), 2 workers",
}
SPE = 128


def child(what: str, quick: bool) -> dict:
    """One measurement, in this process (its KERAS_BACKEND already set)."""
    import daskml_scale
    from bench_training import BATCH, Data, build, build_k
    from daskml_scale import backend

    data = Data(quick)
    steps = -(-len(data.X) // BATCH)
    if what == "local":
        model = build(data.n)
        backend.ensure_built(model, data.X[:2], data.y[:2])
        train = backend.make_train_fn(model)
        train(data.X, data.y, BATCH)  # the trace (JAX: one program per bucket of lengths), not timed
        backend.get_weights(model)
        t = time.perf_counter()
        train(data.X, data.y, BATCH)
        backend.get_weights(model)  # the values are ready (JAX dispatches asynchronously)
        return {"step_ms": 1e3 * (time.perf_counter() - t) / steps}
    if what == "fit":
        m = build_k(data.n, SPE)
        m.fit(data.X[: BATCH * SPE], data.y[: BATCH * SPE], batch_size=BATCH, verbose=0)
        t = time.perf_counter()
        m.fit(data.X, data.y, epochs=1, batch_size=BATCH, verbose=0)
        return {"step_ms": 1e3 * (time.perf_counter() - t) / steps}
    import dask.dataframe as dd

    client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None)
    try:
        rows = data.train.iloc[: len(data.train) // (8 if quick else 4)]
        ddf = dd.from_pandas(rows, npartitions=4).persist()
        strategy = daskml_scale.AllReduce(every=1) if what == "allreduce" else daskml_scale.ParameterServer("sync", push_every=1)
        import keras

        times: list[float] = []

        class EpochClock(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                times.append(time.perf_counter() - self.t)

        daskml_scale.fit(build(data.n), ddf, preprocessor=data.pre, epochs=2, batch_size=BATCH, client=client,
                         verbose=0, strategy=strategy, callbacks=[EpochClock()], shuffle=False)
        per_worker = -(-(len(rows) // 2) // BATCH)  # steps each worker takes in an epoch
        # the second epoch (model built and traced), wall time over the steps: what a user waits
        return {"step_ms": 1e3 * times[-1] / per_worker}
    finally:
        client.close()


def run_child(name: str, what: str, quick: bool) -> dict:
    env = {**os.environ, "KERAS_BACKEND": name, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps([what, quick])],
                          env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {what}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    from _method import Benchmark, Ratio, Variant, add_arguments

    add_arguments(ap)
    args = ap.parse_args()
    if args.child:
        what, quick = json.loads(args.child)
        print(json.dumps(child(what, quick)))
        return 0
    bench = Benchmark.from_args("backends", args, description="TensorFlow against JAX: one training step, each backend in its own process")
    variants = [
        Variant(f"{b}-{w}", lambda b=b, w=w: run_child(b, w, args.quick), f"{b}: {text}", {"backend": b, "what": w})
        for w, text in WHAT.items() for b in BACKENDS
    ]
    ratios = [Ratio(f"jax-{w}", f"tensorflow-{w}", f"JAX vs TensorFlow: {WHAT[w]}", kind="relative") for w in WHAT]
    ratios += [Ratio(f"{b}-{w}", f"{b}-fit", f"{b}: {WHAT[w]} vs its best model.fit step", kind="relative")
               for b in BACKENDS for w in ("local", "allreduce", "ps")]
    bench.compare("step", "one training step (batch 256 per worker), each backend in a fresh process", variants,
                  metric="step_ms", unit="ms", ratios=ratios)
    bench.write()
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
