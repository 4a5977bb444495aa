"""Hyperparameter search (``daskml_scale.search``) on real flights rows and a real cluster.

Small on purpose: a 20,000-row slice of the public flights table, 2-3 epochs, a few
trials. The driver-restart test runs the driver as a real subprocess against the shared
cluster, kills it (SIGKILL) mid-search and starts it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale import ArgumentError, HyperParameters, TrainingError, search
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform, write_csv_shards

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the models
def kt_build_model(hp):
    """Written as for Keras Tuner: nothing of daskml_scale in it."""
    import keras

    model = keras.Sequential()
    model.add(keras.layers.Dense(hp.Int("units", min_value=16, max_value=96, step=16, default=32),
                                 activation=hp.Choice("activation", ["relu", "tanh"])))
    if hp.Boolean("second_layer"):
        model.add(keras.layers.Dense(16, activation="relu"))
    model.add(keras.layers.Dense(1))
    lr = hp.Float("learning_rate", min_value=1e-4, max_value=3e-2, sampling="log", default=1e-3)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="mse", metrics=["mae"])
    return model


def dict_build_model(params, n_features):
    import keras

    if params["mode"] == "bad_params":
        raise ValueError(f"units={params['units']} does not go with mode={params['mode']!r}")
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(params["units"], activation="relu"),
                              keras.layers.Dense(1)])
    if params["mode"] == "nan":
        def loss(y_true, y_pred):
            return keras.ops.mean(keras.ops.square(y_true - y_pred)) * float("nan")
    else:
        loss = "mse"
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return model


def empty_build_model(hp):
    import keras

    model = keras.Sequential([keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


# ---------------------------------------------------------------------------- the data
@pytest.fixture(scope="module")
def rows():
    df = flights().iloc[:20000].reset_index(drop=True)
    is_val = np.random.default_rng(0).random(len(df)) < 0.15
    train, val = df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)
    pre = daskml_scale.Preprocessor(target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL,
                                    transform=flights_transform).fit(train)
    return train, val, pre


def _loads(client) -> dict[str, int]:
    from daskml_scale.search.worker import loads

    return client.run(loads)


# ---------------------------------------------------------------------------- the space
def test_hp_answers_keras_tuner_calls_with_defaults_then_with_given_values():
    hp = HyperParameters()
    assert kt_build_model(hp) is not None
    assert hp.values == {"units": 32, "activation": "relu", "second_layer": False, "learning_rate": 1e-3}
    lr = hp.declared["learning_rate"].distribution
    assert (lr.low, lr.high, lr.log) == (1e-4, 3e-2, True)
    assert hp.declared["units"].distribution.step == 16
    hp2 = HyperParameters({"units": 80, "second_layer": True, "learning_rate": 0.01})
    model = kt_build_model(hp2)
    assert hp2["units"] == 80 and "second_layer" in hp2 and len(model.layers) == 3
    # Keras Tuner's log sampling with a step multiplies: 32, 64, ..., 512
    assert HyperParameters().Int("w", 32, 512, step=2, sampling="log") == 32
    h = HyperParameters()
    h.Int("w", 32, 512, step=2, sampling="log")
    assert list(h.declared["w"].distribution.choices) == [32, 64, 128, 256, 512]
    with pytest.raises(ArgumentError, match="reverse_log"):
        HyperParameters().Float("x", 1e-3, 1.0, sampling="reverse_log")
    with pytest.raises(ArgumentError, match="min_value > 0"):
        HyperParameters().Float("x", 0.0, 1.0, sampling="log")
    with pytest.raises(ArgumentError, match="declared twice"):
        h = HyperParameters()
        h.Int("u", 1, 4)
        h.Int("u", 1, 8)


def test_dict_space_entries_and_their_errors():
    from daskml_scale.search.space import parse_space

    space = parse_space({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, "act": ["relu", "tanh"],
                         "bn": {"type": "bool"}, "dropout": 0.1, "units": {"low": 16, "high": 64, "step": 16}})
    assert space["lr"].log and space["act"].default == "relu" and space["dropout"].distribution is None
    assert space["units"].kind == "int" and space["units"].distribution.step == 16
    for bad, message in [
        ({}, "at least one parameter"),
        ({"dropout": 0.1}, "only fixed values"),
        ({"units": {"type": "int", "low": 16}}, "Expected 'high' for the int parameter 'units'"),
        ({"units": {"type": "integer", "low": 1, "high": 2}}, "type of the parameter 'units'"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "min_value <= max_value for the parameter 'lr'"),
        ({"act": []}, "at least one value for the choice 'act'"),
        ({"units": {"type": "int", "low": 1, "high": 8, "stpe": 2}}, r"Unknown key\(s\) \['stpe'\]"),
    ]:
        with pytest.raises(ArgumentError, match=message):
            parse_space(bad)


def test_bad_input_gets_a_clear_error_before_any_trial(client, rows):
    train, val, pre = rows
    small = train.iloc[:2000]
    with pytest.raises(ArgumentError, match="at least one parameter"):
        search(dict_build_model, small, preprocessor=pre, space={}, trials=2, client=client, verbose=False)
    with pytest.raises(ArgumentError, match=r"declare at least one parameter.*empty space"):
        search(empty_build_model, small, preprocessor=pre, trials=2, client=client, verbose=False)
    with pytest.raises(ArgumentError, match=r"algorithm to be one of 'random', 'tpe', 'hyperband'.*'grid'"):
        search(kt_build_model, small, preprocessor=pre, algorithm="grid", client=client, verbose=False)
    with pytest.raises(ArgumentError, match=r"pruner to be one of"):
        search(kt_build_model, small, preprocessor=pre, pruner="sometimes", client=client, verbose=False)
    with pytest.raises(ArgumentError, match=r"objective to name a metric the model computes: one of "
                                            r"\['loss', 'mae', 'val_loss', 'val_mae'\]. Received: objective='val_auc'"):
        search(kt_build_model, small, preprocessor=pre, objective="val_auc", client=client, verbose=False)
    with pytest.raises(ArgumentError, match=r"val_ objective needs validation_data or validation_fraction"):
        search(kt_build_model, small, preprocessor=pre, objective="val_mae", validation_fraction=0.0, client=client,
               verbose=False)
    with pytest.raises(ArgumentError, match="trials to be an integer >= 1"):
        search(kt_build_model, small, preprocessor=pre, trials=0, client=client, verbose=False)
    assert client.run(lambda: 1)  # the cluster is untouched and well


# ---------------------------------------------------------------------------- searching
@pytest.mark.slow
def test_a_keras_tuner_build_model_runs_unchanged_and_beats_its_defaults(client, rows, tmp_path, capsys):
    """The best of 6 random trials (learning rate on a log scale, width, activation, a
    second layer) has a validation loss at most that of the same model with its default
    parameters trained by plain single-process model.fit on the same rows."""
    import keras

    train, val, pre = rows
    before = _loads(client)
    result = search(kt_build_model, train, preprocessor=pre, trials=6, epochs=3, validation_data=val, seed=3,
                    client=client, verbose=True)
    out = capsys.readouterr().out
    t = result.trials
    assert len(t) == 6 and set(t["state"]) == {"complete"}, t[["trial", "state", "error"]]
    for col in ["params_units", "params_learning_rate", "params_activation", "params_second_layer",
                "val_loss_epoch_1", "val_loss_epoch_3", "seconds", "worker"]:
        assert t[col].notna().all(), col
    assert (t["epochs"] == 3).all() and (t["seconds"] > 0).all()
    assert t["params_learning_rate"].between(1e-4, 3e-2).all() and set(t["params_units"]) <= set(range(16, 97, 16))
    # concurrent: both workers ran trials, and some trials overlapped in time
    assert t["worker"].nunique() == 2
    spans = sorted(zip(t["started"], t["finished"]))
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
    # the data was prepared once: one copy per worker for the whole search
    after = _loads(client)
    assert {w: after[w] - before.get(w, 0) for w in after} == {w: 1 for w in after}
    # the best row is the best
    best_row = t.loc[t["val_loss"].idxmin()]
    assert result.best_trial == best_row["trial"] and result.best_value == pytest.approx(best_row["val_loss"])
    assert result.best_params == {k[len("params_"):]: best_row[k] for k in t.columns if k.startswith("params_")}
    # the progress display said where the search stood
    assert "trials 6/6 done" in out and f"best val_loss {result.best_value:.5g}" in out, out

    # the defaults, by plain model.fit on the same rows
    keras.utils.set_random_seed(0)
    default = kt_build_model(HyperParameters())
    X, y = pre.transform(train)
    Xv, yv = pre.transform(val)
    default.fit(X, y, epochs=3, batch_size=256, verbose=0)
    default_loss = float(default.evaluate(Xv, yv, batch_size=4096, verbose=0)[0])
    assert result.best_value <= default_loss, (result.best_value, default_loss, result.best_params)

    # the best model is the best trial's at its best epoch, and saves as a bundle
    model = result.best_model()
    assert float(model.evaluate(Xv, yv, batch_size=4096, verbose=0)[0]) == pytest.approx(result.best_value, rel=1e-3)
    path = daskml_scale.save_bundle(model, pre, str(tmp_path / "best.bundle"))
    bundle = daskml_scale.load_bundle(path)
    import dask.dataframe as dd

    preds = daskml_scale.predict(bundle, dd.from_pandas(val.iloc[:50], npartitions=1)).compute()
    assert len(preds) == 50 and np.isfinite(preds.iloc[:, -1].to_numpy(dtype=float)).all()
    fig = result.plot(str(tmp_path / "search.png"))
    assert (tmp_path / "search.png").stat().st_size > 10_000 and len(fig.axes) >= 4
    assert isinstance(result.study, optuna.Study) and len(result.study.trials) == 6


@pytest.mark.slow
def test_pruned_trials_stop_early_and_their_epochs_are_recorded(client, rows):
    train, val, pre = rows
    result = search(kt_build_model, train, preprocessor=pre, trials=8, epochs=3, algorithm="hyperband",
                    validation_data=val, seed=5, client=client, verbose=False)
    t = result.trials
    assert len(t) == 8 and set(t["state"]) <= {"complete", "pruned"}, t[["state", "error"]]
    pruned, complete = t[t["state"] == "pruned"], t[t["state"] == "complete"]
    assert len(pruned) >= 1 and len(complete) >= 1, t[["trial", "state", "epochs", "val_loss"]]
    assert (pruned["epochs"] < 3).all() and (complete["epochs"] == 3).all()
    curves = t[[f"val_loss_epoch_{k}" for k in (1, 2, 3)]]
    assert (curves.notna().sum(axis=1) == t["epochs"]).all()  # one objective per epoch run, none after
    states = {tr.number: tr.state for tr in result.study.trials}
    assert all(states[n] == optuna.trial.TrialState.PRUNED for n in pruned["trial"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # BruteForceSampler
def test_failing_trials_are_recorded_and_the_search_goes_on(client, rows):
    train, val, pre = rows
    sampler = optuna.samplers.BruteForceSampler(seed=0)
    result = search(dict_build_model, train.iloc[:8000], preprocessor=pre, trials=3, epochs=2,
                    space={"mode": ["ok", "bad_params", "nan"], "units": 16}, algorithm=sampler,
                    validation_data=val, client=client, verbose=False)
    t = result.trials.set_index("params_mode")
    assert sorted(t.index) == ["bad_params", "nan", "ok"]
    assert t.loc["ok", "state"] == "complete" and t.loc["ok", "epochs"] == 2
    assert t.loc["bad_params", "state"] == "failed"
    assert t.loc["bad_params", "error"] == "ValueError: units=16 does not go with mode='bad_params'"
    assert t.loc["nan", "state"] == "failed" and "training loss is nan after epoch 1" in t.loc["nan", "error"]
    assert result.best_params == {"mode": "ok", "units": 16}
    # every trial failing: a result with no best model, and an error saying why
    only_bad = search(dict_build_model, train.iloc[:4000], preprocessor=pre, trials=1, epochs=1,
                      space={"mode": ["nan"], "units": 8}, client=client, verbose=False)
    assert list(only_bad.trials["state"]) == ["failed"] and only_bad.best_trial is None
    # a build_model that fails with the default parameters fails the call, before any trial
    with pytest.raises(ArgumentError, match=r"build_model failed with the default parameters \{'mode': 'bad_params'"):
        search(dict_build_model, train.iloc[:4000], preprocessor=pre, space={"mode": ["bad_params", "ok"], "units": 8},
               client=client, verbose=False)
    with pytest.raises(TrainingError, match="No trial of the search completed"):
        only_bad.best_model()


DRIVER = textwrap.dedent("""
    import json, sys
    from distributed import Client
    import pandas as pd
    import daskml_scale
    from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights_transform

    def build_model(hp):
        import keras
        m = keras.Sequential([keras.layers.Dense(hp.Int("units", 16, 64, step=16), activation="relu"),
                              keras.layers.Dense(1)])
        m.compile(optimizer=keras.optimizers.Adam(hp.Float("lr", 1e-3, 1e-2, sampling="log")), loss="mse")
        return m

    address, data, storage, out = sys.argv[1:5]
    client = Client(address, timeout="60s")
    train = pd.read_csv(data)
    pre = daskml_scale.Preprocessor(target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL,
                                    transform=flights_transform).fit(train)
    result = daskml_scale.search(build_model, train, preprocessor=pre, trials=6, epochs=3, max_concurrent=2,
                                 validation_fraction=0.15, seed=11, storage=storage, study_name="restart",
                                 client=client, verbose=True)
    daskml_scale.save_bundle(result.best_model(), pre, out + ".bundle")
    json.dump({"best_trial": result.best_trial, "best_value": result.best_value,
               "stale": result.summary["stale_trials"], "states": result.trials["state"].tolist()},
              open(out, "w"))
""")


def _study_made(db: Path, name: str) -> bool:
    """Whether the driver has made the study ``name`` in the SQLite file ``db``, read without
    opening an optuna storage: opening one while the driver is still setting the schema up
    races it over alembic's version row (the driver then fails with a UNIQUE constraint)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
    except sqlite3.Error:
        return False


@pytest.mark.slow
def test_the_study_resumes_from_its_storage_after_the_driver_is_killed(client, rows, tmp_path):
    train, _, _ = rows
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    data = tmp_path / "train.csv"
    train.iloc[:8000].to_csv(data, index=False)
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(script), client.scheduler.address, str(data), storage, str(out)]
    first = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    S = optuna.trial.TrialState
    done_before: dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            if _study_made(db, "restart"):
                try:
                    trials = optuna.load_study(study_name="restart", storage=storage).trials
                except Exception:  # noqa: BLE001  (the study is not created yet)
                    trials = []
                complete = [tr for tr in trials if tr.state == S.COMPLETE]
                if len(complete) >= 2 and any(tr.state == S.RUNNING for tr in trials):
                    done_before = {tr.number: (tr.params, tr.value) for tr in complete}
                    break
            time.sleep(0.3)
        else:
            pytest.fail("the first driver did not finish two trials in time")
    finally:
        first.kill()  # SIGKILL: no cleanup of any kind in the driver
        first.wait(timeout=60)
    left = optuna.load_study(study_name="restart", storage=storage).trials
    running = [tr.number for tr in left if tr.state == S.RUNNING]
    assert running, [(tr.number, tr.state) for tr in left]

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    report = json.loads(out.read_text())
    study = optuna.load_study(study_name="restart", storage=storage)
    by_number = {tr.number: tr for tr in study.trials}
    # the trials finished before the kill are kept as they were
    for number, (params, value) in done_before.items():
        assert by_number[number].params == params and by_number[number].value == pytest.approx(value)
    # those left running were marked failed and run again with the same parameters
    assert sorted(report["stale"]) == sorted(running)
    for number in running:
        assert by_number[number].state == S.FAIL
        reruns = [tr for tr in study.trials if tr.user_attrs.get("rerun_of") == number]
        assert len(reruns) == 1 and reruns[0].params == by_number[number].params
        assert reruns[0].state in (S.COMPLETE, S.PRUNED)
    counted = [tr for tr in study.trials if tr.number not in running]
    assert len(counted) == 6 and all(tr.state == S.COMPLETE for tr in counted)
    assert report["best_value"] == pytest.approx(min(tr.value for tr in counted))
    assert daskml_scale.load_bundle(str(out) + ".bundle").model is not None


@pytest.mark.slow
def test_cli_search_writes_the_trials_csv_and_the_best_bundle(client, rows, tmp_path, capsys):
    from daskml_scale.cli import main

    train, val, _ = rows
    write_csv_shards(train.iloc[:6000], str(tmp_path / "train"), 2)
    (tmp_path / "model_def.py").write_text(textwrap.dedent("""
        import keras

        def build_model(params, n_features):
            m = keras.Sequential([keras.Input((n_features,)),
                                  keras.layers.Dense(params["units"], activation=params["activation"]),
                                  keras.layers.Dense(1)])
            m.compile(optimizer=keras.optimizers.Adam(params["lr"]), loss="mse", metrics=["mae"])
            return m
    """))
    (tmp_path / "space.yaml").write_text(textwrap.dedent("""
        lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
        units: {type: int, low: 16, high: 32, step: 16}
        activation: [relu, tanh]
    """))
    out = tmp_path / "best.bundle"
    code = main(["search", "--scheduler", client.scheduler.address, "--data", str(tmp_path / "train"),
                 "--target", "arr_delay", "--numeric", *FLIGHTS_NUMERIC, "--categorical", *FLIGHTS_CATEGORICAL,
                 "--transform", "daskml_scale.datasets:flights_transform", "--model",
                 f"{tmp_path / 'model_def.py'}:build_model", "--space", str(tmp_path / "space.yaml"),
                 "--trials", "3", "--epochs", "2", "--objective", "val_mae", "--seed", "2", "-q",
                 "--out", str(out), "--plot", str(tmp_path / "search.png")])
    assert code == 0
    trials = pd.read_csv(str(out) + ".trials.csv")
    assert len(trials) == 3 and {"params_lr", "params_units", "params_activation", "val_mae_epoch_2"} <= set(trials)
    info = daskml_scale.load_bundle(str(out)).info()
    assert info["training_summary"]["search"]["best_params"]["units"] in (16, 32)
    assert (tmp_path / "search.png").exists()
    # a malformed space names the file and the line
    (tmp_path / "bad.yaml").write_text("lr: {type: float, low: 1.0e-3, high: 1.0e-2}\nunits: {type: int, low: 16}\n")
    assert main(["search", "--scheduler", client.scheduler.address, "--data", str(tmp_path / "train"),
                 "--target", "arr_delay", "--numeric", "distance", "--model", f"{tmp_path / 'model_def.py'}:build_model",
                 "--space", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x.bundle"), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"--space {tmp_path / 'bad.yaml'}, line 2: Expected 'high' for the int parameter 'units'" in err, err


@pytest.mark.slow
def test_a_worker_lost_mid_trial_costs_that_epoch_only(own_client, rows):
    """SIGKILL of a worker while it trains an epoch of a trial: Dask reruns the epoch on the
    other worker from the state the driver holds; every trial still completes all its epochs."""
    import signal
    import threading

    train, val, pre = rows
    pids = own_client.run(os.getpid)
    box: dict = {}

    def run():
        try:
            box["result"] = search(kt_build_model, train.iloc[:8000], preprocessor=pre, trials=4, epochs=3,
                                   validation_data=val, seed=1, client=own_client, verbose=False)
        except BaseException as exc:  # noqa: BLE001  (re-raised below, in the test's thread)
            box["error"] = exc

    job = threading.Thread(target=run)
    job.start()
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and job.is_alive():
        for worker, keys in own_client.processing().items():
            if any("daskml-search-" in str(k) and "-e1-" in str(k) for k in keys):  # a trial's second epoch
                victim = worker
                break
        time.sleep(0.05)
    assert victim is not None, "no trial reached its second epoch"
    os.kill(pids[victim], signal.SIGKILL)
    job.join(timeout=600)
    assert not job.is_alive(), "the search did not return"
    if "error" in box:
        raise box["error"]
    result = box["result"]
    t = result.trials
    assert list(t["state"]) == ["complete"] * 4 and (t["epochs"] == 3).all(), t[["state", "epochs", "error"]]
    assert victim in result.summary["lost_workers"]
    # the nanny's new worker is up and idle before the cluster closes (a worker still starting
    # on a loaded machine makes the fixture's close time out)
    own_client.wait_for_workers(2, timeout=180)
    own_client.run(lambda: 1)
    time.sleep(2)
