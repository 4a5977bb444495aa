"""Keras backends: the compiled loops against Keras's own, bundles across backends,
workers on another backend refused by name, and the GPU check script run on CPU.

The whole module runs under whatever ``KERAS_BACKEND`` the session has; CI runs it
under TensorFlow and under JAX (``make test``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import daskml_scale
from daskml_scale import backend
from daskml_scale.bundle import save_bundle
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform
from daskml_scale.exceptions import ClusterError

from .conftest import ProcessCluster

ROOT = Path(__file__).resolve().parent.parent
OTHER = "jax" if backend.name() != "jax" else "tensorflow"


def _other_backend_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("jax" if OTHER == "jax" else "tensorflow") is not None


needs_other = pytest.mark.skipif(not _other_backend_installed(), reason=f"the {OTHER} backend is not installed")


@pytest.fixture(scope="module")
def table():
    return diamonds().iloc[:2000]


@pytest.fixture(scope="module")
def pre(table):
    return daskml_scale.Preprocessor(
        target="log_price", numeric=[*DIAMONDS_NUMERIC, "volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=diamonds_transform,
    ).fit(table)


def build(n: int):
    import keras

    with daskml_scale.seeded(3):
        model = keras.Sequential([keras.Input((n,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse", metrics=["mae"])
    return model


def test_the_compiled_train_loop_is_kerass_own_fit_step_for_step(table, pre):
    X, y = pre.transform(table)
    ours, keras_own = build(X.shape[1]), build(X.shape[1])
    backend.ensure_built(ours, X, y)
    steps = backend.make_train_fn(ours)(X[:1000], y[:1000], 64)  # 15 full batches and a partial one
    keras_own.fit(X[:1000], y[:1000], batch_size=64, epochs=1, shuffle=False, verbose=0)
    assert steps == 16
    for a, b in zip(backend.get_weights(ours), keras_own.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    backend.reset_metrics(ours)
    backend.make_eval_fn(ours)(X[1000:], y[1000:], 128)
    got = backend.metric_results(ours, backend.metric_state(ours))
    expected = keras_own.evaluate(X[1000:], y[1000:], batch_size=128, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    forward = backend.compiled_forward(ours)
    np.testing.assert_allclose(forward(X[:77]), keras_own.predict(X[:77], verbose=0), rtol=1e-4, atol=1e-5)


def test_a_packed_round_sets_the_state_trains_and_reads_it_back(table, pre):
    """AllReduce's round of local steps in one call is the same as its pieces one by one:
    set the weights and Adam's slots, train, read them (a model with a second optimizer
    state it does not carry: the step counter, int64)."""
    import keras

    X, y = pre.transform(table)
    n = X.shape[1]

    def adam_model():
        with daskml_scale.seeded(5):
            m = keras.Sequential([keras.Input((n,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
        m.compile(keras.optimizers.Adam(1e-2), "mse")
        backend.ensure_built(m, X, y)
        return m

    def state_vars(m):
        return list(m.weights) + [v for v in backend.optimizer_variables(m) if v.dtype == "float32"]

    ours, pieces = adam_model(), adam_model()
    fn = backend.make_packed_train_fn(ours, state_vars(ours))
    first = fn(X[:640], y[:640], 64, None)  # None: the model's own state
    backend.make_train_fn(pieces)(X[:640], y[:640], 64)
    np.testing.assert_allclose(first, np.concatenate([np.ravel(v.numpy()) for v in state_vars(pieces)]),
                               rtol=1e-5, atol=1e-6)
    assert first.dtype == np.float32 and first.size == sum(int(np.prod(v.shape)) for v in state_vars(ours))

    given = (first * 0.5).astype(np.float32)  # another state in: set before the steps
    second = fn(X[640:1280], y[640:1280], 64, given)
    for v, value in zip(state_vars(pieces), backend.unpack(given, [tuple(v.shape) for v in state_vars(pieces)])):
        v.assign(value)
    backend.make_train_fn(pieces)(X[640:1280], y[640:1280], 64)
    np.testing.assert_allclose(second, np.concatenate([np.ravel(v.numpy()) for v in state_vars(pieces)]),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(second, first)
    assert int(ours.optimizer.iterations.numpy()) == 20  # the counter is the model's own, stepped


@pytest.mark.parametrize("functions", [("train",), ("local_sgd",), ("gradients",), ("fused",)])
def test_a_workers_warm_up_compiles_what_the_strategy_calls_and_leaves_the_state_as_built(table, pre, functions):
    """``warm_model`` (what a fit runs on each worker before the data is ready) traces the
    strategy's functions and the evaluation, and the model comes out of it with the weights,
    optimizer slots (Adam's step counter too) and metrics it went in with."""
    import keras

    from daskml_scale.custom_objects import ship_model
    from daskml_scale.training import worker

    X, y = pre.transform(table)
    with daskml_scale.seeded(7):
        model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse", metrics=["mae"])
    backend.ensure_built(model, X, y)
    shipped = ship_model(model, backend.model_to_bytes(model))
    fit_id = f"warm-{functions[0]}-{backend.name()}"
    try:
        timings = worker.warm_model(fit_id, shipped, X[:2], y[:2], 32, functions, True)
    except backend.BackendUnsupportedError:
        pytest.skip(f"{functions[0]} is not implemented on {backend.name()}")
    warmed = worker.model_for(fit_id, shipped).model
    for a, b in zip(backend.get_weights(warmed), backend.get_weights(model)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(backend.get_optimizer_state(warmed), backend.get_optimizer_state(model)):
        np.testing.assert_array_equal(a, b)
    assert int(np.asarray(warmed.optimizer.iterations)) == 0
    assert all(float(np.sum(v)) == 0.0 for m in backend.metric_state(warmed) for v in m)
    assert timings["warm_s"] > 0
    if functions[0] in ("train", "local_sgd"):
        assert "first_train_call_s" in timings  # the loop was called (and traced) in the warm-up
        cached = worker.model_for(fit_id, shipped)
        steps_before = int(np.asarray(warmed.optimizer.iterations))
        if functions[0] == "train":
            cached.train(X[:64], y[:64], 32)
        else:
            cached.train_round(X[:64], y[:64], 32, None)
        assert int(np.asarray(warmed.optimizer.iterations)) == steps_before + 2  # it trains after


@needs_other
@pytest.mark.slow
def test_a_bundle_saved_on_one_backend_predicts_the_same_on_the_other(tmp_path, table, pre):
    X, y = pre.transform(table)
    model = build(X.shape[1])
    model.fit(X, y, epochs=2, batch_size=128, verbose=0)
    url = str(tmp_path / "m.bundle")
    save_bundle(model, pre, url)
    rows = table.drop(columns=["price"]).iloc[:200]
    rows.to_csv(tmp_path / "rows.csv", index=False)
    here = daskml_scale.load_bundle(url).predict_frame(rows)["prediction"].to_numpy()
    script = (
        "import sys, pandas as pd, daskml_scale\n"
        "from daskml_scale import backend\n"
        "b = daskml_scale.load_bundle(sys.argv[1])\n"
        "p = b.predict_frame(pd.read_csv(sys.argv[2]))\n"
        "p['prediction'].to_csv(sys.argv[3], index=False)\n"
        "print(backend.name())\n"
    )
    env = {**os.environ, "KERAS_BACKEND": OTHER, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, url, str(tmp_path / "rows.csv"), str(tmp_path / "out.csv")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == OTHER
    import pandas as pd

    there = pd.read_csv(tmp_path / "out.csv")["prediction"].to_numpy()
    np.testing.assert_allclose(there, here, rtol=1e-4, atol=1e-4)


@needs_other
@pytest.mark.slow
def test_connect_refuses_workers_on_another_backend(tmp_path):
    cluster = ProcessCluster(tmp_path, n_workers=1, env={"KERAS_BACKEND": OTHER})
    try:
        cluster.wait_for_workers(1)
        with pytest.raises(ClusterError, match=f"driver's Keras backend '{backend.name()}'.*runs '{OTHER}'"):
            daskml_scale.connect(cluster.address)
    finally:
        cluster.close()


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("jax") is None, reason="jax is not installed")
def test_the_gpu_check_script_runs_its_steps_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--rows", "40000", "--train-rows", "20000",
         "--epochs", "1", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["backend"] == "jax" and result["mode"] == "cpu" and result["workers"] == 2
    assert set(result["fit"]) == {"averaging", "allreduce"}
    assert all(np.isfinite(f["val_loss"]) for f in result["fit"].values())
    assert result["predict"]["rows"] == 40000 and result["predict"]["features_array_rows_s"] > 0
    assert result["csv"]["failed"] == 0 and result["csv"]["files"] >= 2


@pytest.mark.skipif(backend.name() != "tensorflow", reason="TensorFlow's retracing warning")
def test_many_models_in_one_process_do_not_blame_the_user_for_retracing():
    """Each model's compiled loops are traced once: TensorFlow's "triggered tf.function
    retracing" warning about them is dropped, one about the user's own function is not."""
    import logging

    import keras
    import tensorflow as tf

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        X = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
        y = X.sum(axis=1)
        for _ in range(7):
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            model.compile("adam", "mse")
            backend.ensure_built(model, X, y)
            assert backend.make_train_fn(model)(X, y, 8) == 4
            for _ in range(2):  # the second call traces the graph assignment
                backend.set_weights(model, backend.get_weights(model))
        ours = [r for r in records if "retracing" in r]
        assert ours == []
        for i in range(7):  # the user's own function, made anew in a loop: TensorFlow's advice applies
            tf.function(lambda x: x + 1)(tf.constant(float(i)))
        assert any("retracing" in r and "<lambda>" in r for r in records)
    finally:
        logger.removeHandler(handler)
