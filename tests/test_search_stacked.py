"""Stacked trials in ``daskml_scale.search``: trials of one architecture shape trained as one
program (a pack), each with its own settings, objective, pruning and failure.

Real flights rows (a small slice), the suite's shared cluster (2 workers x 1 thread).
The equality test runs the same grid twice, stacked and alone, and compares every
trial's per-epoch losses: same seeds, same shuffles, deterministic models (dropout 0 for
the compared trials).
"""

from __future__ import annotations

import math

import dask
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale import ArgumentError, search
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform

optuna = pytest.importorskip("optuna")
keras = pytest.importorskip("keras")
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="stacking runs on TensorFlow")


@pytest.fixture(scope="module")
def rows():
    df = flights().iloc[:6000].reset_index(drop=True)
    is_val = np.random.default_rng(1).random(len(df)) < 0.2
    train, val = df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)
    pre = daskml_scale.Preprocessor(target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL,
                                    transform=flights_transform).fit(train)
    return train, val, pre


def adam_model(params, n_features):
    """Dense 16 relu -> Dropout -> Dense 1; the learning rate and the dropout rate per trial."""
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(params["dropout"]), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(params["lr"]), loss="mse")
    return model


def sgd_l2_model(params, n_features):
    """SGD with momentum, an L2 penalty on the first kernel; momentum and penalty per trial."""
    model = keras.Sequential([
        keras.Input((n_features,)),
        keras.layers.Dense(8, activation="relu", kernel_regularizer=keras.regularizers.L2(params["l2"])),
        keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(params["lr"], momentum=params["momentum"]),
                  loss=keras.losses.Huber(delta=20.0))
    return model


def sgd_mse_model(params, n_features):
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(params["lr"]), loss="mse")
    return model


def width_model(params, n_features):
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(params["units"], activation="relu"),
                              keras.layers.Dense(1)])
    metrics = ["mae"] if params["units"] == 4 else []
    model.compile(optimizer=keras.optimizers.Adam(params["lr"]), loss="mse", metrics=metrics)
    return model


def _run(build, space, rows, client, *, stack, epochs=2, pruner=None, seed=3, min_trials=2):
    train, val, pre = rows
    grid = {n: list(v) for n, v in space.items()}
    trials = int(np.prod([len(v) for v in grid.values()]))
    with dask.config.set({"daskml_scale.search.stack-min-trials": min_trials}):
        return search(build, train, preprocessor=pre, space=space, trials=trials, epochs=epochs,
                      algorithm=optuna.samplers.GridSampler(grid, seed=seed), pruner=pruner,
                      validation_data=val, seed=seed, client=client, verbose=False, stack=stack)


def _history(result):
    return {t.number: (t.params, t.user_attrs["history"]) for t in result.study.trials}


@pytest.mark.slow
@pytest.mark.parametrize("build, space", [
    (adam_model, {"lr": [1e-3, 4e-3], "dropout": [0.0, 0.3]}),
    (sgd_l2_model, {"lr": [1e-4, 3e-4], "momentum": [0.0, 0.9], "l2": [0.0, 0.01]}),
], ids=["adam-dropout", "sgd-momentum-l2"])
def test_a_stacked_trial_loses_what_it_loses_alone(client, rows, build, space):
    stacked = _run(build, space, rows, client, stack=True)
    alone = _run(build, space, rows, client, stack=False)
    ts, ta = stacked.trials, alone.trials
    assert (ts["state"] == "complete").all() and (ta["state"] == "complete").all(), ts[["state", "error"]]
    # every trial in a pack; one pack per worker thread (2), so that both threads work
    assert ts["pack"].notna().all() and ts["pack"].nunique() == 2, ts[["trial", "pack"]]
    assert ta["pack"].isna().all()
    assert stacked.summary["stacking"]["packs"] == 2 and alone.summary["stacking"]["packs"] == 0
    hs, ha = _history(stacked), _history(alone)
    compared = 0
    for number, (params, history) in hs.items():
        assert ha[number][0] == params  # the same grid point under the same trial number (its seed)
        if params.get("dropout", 0.0) > 0:  # dropout draws its own masks when stacked: equal in distribution
            assert all(math.isfinite(v) for v in history["loss"])
            continue
        for name in ("loss", "val_loss"):
            np.testing.assert_allclose(history[name], ha[number][1][name], rtol=2e-4, err_msg=f"{name} {params}")
        compared += 1
    assert compared >= 2
    assert stacked.best_params == alone.best_params
    model = stacked.best_model()
    assert isinstance(model, keras.Model) and model.optimizer is not None
    _, val, pre = rows
    X, y = pre.transform(val)
    got = model.evaluate(X, y, verbose=0, batch_size=1024)
    assert got == pytest.approx(stacked.best_value, rel=1e-4)  # its weights at its best epoch
    if not stacked.best_params.get("dropout"):
        np.testing.assert_allclose(model.predict(X[:64], verbose=0), alone.best_model().predict(X[:64], verbose=0),
                                   rtol=1e-3, atol=1e-3)


class _PruneTrial(optuna.pruners.BasePruner):
    """Prunes one trial at the end of its first epoch, no other."""

    def __init__(self, number: int) -> None:
        self.number = number

    def prune(self, study, trial) -> bool:
        return trial.number == self.number and trial.last_step == 1


def test_a_pruned_trial_leaves_its_pack_and_the_others_go_on(client, rows):
    result = _run(adam_model, {"lr": [1e-3, 2e-3, 3e-3], "dropout": [0.0]}, rows, client, stack=True, epochs=3,
                  pruner=_PruneTrial(1))
    t = result.trials.set_index("trial")
    assert t["pack"].notna().all() and t["pack"].nunique() == 1
    assert t.loc[1, "state"] == "pruned" and t.loc[1, "epochs"] == 1
    assert np.isnan(t.loc[1, "val_loss_epoch_2"])
    others = t.drop(index=1)
    assert (others["state"] == "complete").all() and (others["epochs"] == 3).all()
    assert others[[f"val_loss_epoch_{k}" for k in (1, 2, 3)]].notna().all().all()
    assert result.best_trial in (0, 2)


@pytest.mark.slow
def test_a_diverging_trial_fails_without_failing_its_pack_mates(client, rows):
    space = {"lr": [1e-4, 1e9, 2e-4]}
    stacked = _run(sgd_mse_model, space, rows, client, stack=True)
    t = stacked.trials.set_index("params_lr")
    assert t["pack"].notna().all() and t["pack"].nunique() == 1
    assert t.loc[1e9, "state"] == "failed" and "diverged" in t.loc[1e9, "error"]
    assert (t.drop(index=1e9)["state"] == "complete").all() and (t.drop(index=1e9)["epochs"] == 2).all()
    # its pack mates trained as they would have without it
    alone = _run(sgd_mse_model, space, rows, client, stack=False)
    hs, ha = _history(stacked), _history(alone)
    for number, (params, history) in hs.items():
        if params["lr"] < 1:
            np.testing.assert_allclose(history["val_loss"], ha[number][1]["val_loss"], rtol=2e-4)


def test_other_shapes_models_with_metrics_and_small_groups_train_alone(client, rows):
    result = _run(width_model, {"units": [4, 8, 8, 12], "lr": [1e-3, 2e-3]}, rows, client, stack=True, epochs=1,
                  min_trials=3)
    t = result.trials
    assert (t["state"] == "complete").all(), t[["state", "error"]]
    by_units = t.groupby("params_units")["pack"]
    assert by_units.get_group(4).isna().all()  # it computes a metric: alone
    assert by_units.get_group(8).notna().all() and by_units.get_group(8).nunique() == 1  # 4 trials of one shape
    assert by_units.get_group(12).isna().all()  # 2 trials of their shape: fewer than stack-min-trials
    reasons = result.summary["stacking"]["not_stacked"]
    assert any("metrics" in r for r in reasons) and reasons.get("fewer than 3 trials of its shape asked together") == 2
    assert isinstance(result.best_model(), keras.Model)


def test_stack_must_be_a_bool(client, rows):
    train, _, pre = rows
    with pytest.raises(ArgumentError, match="stack=True or stack=False"):
        search(adam_model, train, preprocessor=pre, space={"lr": [1e-3], "dropout": 0.0}, stack="yes",
               client=client, verbose=False)


def test_trials_frame_names_the_pack_column():
    from daskml_scale.search.result import trials_frame

    study = optuna.create_study()
    frame = trials_frame(study, "val_loss", 2)
    assert "pack" in frame.columns and isinstance(frame, pd.DataFrame)
