"""fit() with ModelAveraging on a real LocalCluster (2 worker processes x 1 thread)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import daskml_scale
from daskml_scale.exceptions import DataError, MissingColumnError, WorkersLostError
from daskml_scale.training.averaging import weighted_average
from daskml_scale.training.checkpoint import load_checkpoint
from daskml_scale.training.worker import models_built
from tests.training.conftest import build_model, make_preprocessor

pytestmark = pytest.mark.slow

EPOCHS = 3
BATCH = 128


def fit_averaging(model, data, pre, client, **kw):
    kw.setdefault("strategy", daskml_scale.ModelAveraging(sync_every=16))
    kw.setdefault("validation_data", data.val_ddf())
    return daskml_scale.fit(model, data.ddf(), preprocessor=pre, epochs=kw.pop("epochs", EPOCHS),
                            batch_size=BATCH, client=client, verbose=0, **kw)


def test_two_workers_reach_single_process_quality(flights_data, client):
    """The issue's workload: 2 workers, the default ModelAveraging, same epochs and
    batch size as a single-process model.fit, validation loss within 5%."""
    import keras

    pre, epochs, batch = flights_data.pre, 3, 256

    def build():
        with daskml_scale.seeded(0):
            m = keras.Sequential([
                keras.Input((len(pre.feature_names_),)), keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1),
            ])
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
        return m

    model = build()
    before = client.run(models_built)
    history = daskml_scale.fit(
        model, daskml_scale.read_csv(str(flights_data.root / "train" / "*.csv")), preprocessor=pre,
        epochs=epochs, batch_size=batch, validation_data=daskml_scale.read_csv(str(flights_data.root / "val" / "*.csv")),
        client=client, verbose=0,
    )
    after = client.run(models_built)
    ours = history.history["val_loss"][-1]
    X, y = pre.transform(flights_data.train)
    Xv, yv = pre.transform(flights_data.val)
    single = build().fit(X, y, epochs=epochs, batch_size=batch, validation_data=(Xv, yv), verbose=0)
    assert ours <= 1.05 * single.history["val_loss"][-1], (ours, single.history["val_loss"])
    # Keras-like history: per-epoch training and validation loss and metrics
    assert set(history.history) >= {"loss", "mae", "val_loss", "val_mae"}
    assert all(len(v) == epochs for v in history.history.values())
    # the fitted weights are in the driver's model: evaluating it here agrees
    local = model.evaluate(Xv, yv, verbose=0, return_dict=True, batch_size=4096)
    assert local["loss"] == pytest.approx(ours, rel=1e-4)
    assert local["mae"] == pytest.approx(history.history["val_mae"][-1], rel=1e-4)
    # each worker built its model copy once for the whole fit
    assert all(after[w] - before[w] == 1 for w in after)
    summary = history.daskml_summary
    assert summary["workers"] == 2 and summary["train_rows"] == len(X)


def test_training_rows_stay_on_their_workers(diamond_data, fitted_pre, client):
    import uuid

    def incoming_keys(dask_worker):
        return [str(k) for entry in dask_worker.transfer_incoming_log for k in entry["keys"]]

    client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
    model = build_model(len(fitted_pre.feature_names_))
    fit_averaging(model, diamond_data, fitted_pre, client, epochs=1)
    # one transfer made on purpose, so that reading nothing cannot pass
    a, b = sorted(client.scheduler_info()["workers"])
    probe = client.submit(bytes, 1000, key=f"transfer-probe-{uuid.uuid4().hex}", workers=[a])
    assert client.submit(len, probe, workers=[b], pure=False).result() == 1000
    incoming = [k for keys in client.run(incoming_keys).values() for k in keys]
    assert str(probe.key) in incoming, incoming
    moved = [k for k in incoming if "train-prep" in k]
    assert len(moved) <= 1  # at most the one partition the balancer may move


def test_streaming_mode_trains_without_caching(diamond_data, fitted_pre, client):
    def held() -> set:
        return {str(k) for k in client.who_has() if "train-prep" in str(k)}

    before = held()  # an earlier fit's partitions may still be on their way out
    model = build_model(len(fitted_pre.feature_names_))
    history = fit_averaging(model, diamond_data, fitted_pre, client, cache=False, epochs=2)
    assert history.daskml_summary["cached"] is False
    assert history.history["val_loss"][-1] < history.history["val_loss"][0]
    assert not held() - before  # this fit kept no prepared partition in the cluster


def test_optimizer_state_is_averaged_or_reset(diamond_data, fitted_pre, client):
    kept = build_model(len(fitted_pre.feature_names_))
    fit_averaging(kept, diamond_data, fitted_pre, client, epochs=1,
                  strategy=daskml_scale.ModelAveraging(sync_every=16, optimizer_state="average"))
    steps_per_worker = int(np.ceil(12_000 / BATCH))
    assert int(kept.optimizer.iterations.numpy()) == pytest.approx(steps_per_worker, abs=2)
    moments = [v for v in kept.optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert moments and all(np.abs(v.numpy()).sum() > 0 for v in moments)

    reset = build_model(len(fitted_pre.feature_names_))
    fit_averaging(reset, diamond_data, fitted_pre, client, epochs=1,
                  strategy=daskml_scale.ModelAveraging(sync_every=16, optimizer_state="reset"))
    assert int(reset.optimizer.iterations.numpy()) == 0  # the driver keeps the fresh slots


def test_batchnorm_statistics_are_averaged(diamond_data, fitted_pre, client):
    model = build_model(len(fitted_pre.feature_names_), batchnorm=True)
    bn = model.layers[1]
    fit_averaging(model, diamond_data, fitted_pre, client, epochs=1)
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)
    assert not np.allclose(bn.moving_variance.numpy(), 1.0)
    assert (bn.moving_variance.numpy() > 0).all()


def test_weighted_average_weights_by_samples():
    a = [np.array([0.0, 0.0]), np.array(4, dtype=np.int64)]
    b = [np.array([3.0, 6.0]), np.array(6, dtype=np.int64)]
    out = weighted_average([a, b], [1, 2])
    np.testing.assert_allclose(out[0], [2.0, 4.0])
    assert out[1] == 6  # step counters: the max


def test_callbacks_fire_on_the_driver(diamond_data, fitted_pre, client, tmp_path):
    import keras

    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, dict(logs)))

    model = build_model(len(fitted_pre.feature_names_))
    ckpt_file = str(tmp_path / "best.keras")
    history = fit_averaging(
        model, diamond_data, fitted_pre, client, epochs=3,
        callbacks=[
            Recorder(),
            keras.callbacks.ModelCheckpoint(ckpt_file, monitor="val_loss"),
            keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=1e9),  # stops after 2 epochs
        ],
    )
    assert [e for e, _ in seen] == [0, 1]
    assert "val_loss" in seen[0][1] and "loss" in seen[0][1]
    assert len(history.history["loss"]) == 2
    assert os.path.exists(ckpt_file)


def test_terminate_on_nan(diamond_data, fitted_pre, client):
    import keras

    model = build_model(len(fitted_pre.feature_names_), lr=1e12)
    history = fit_averaging(model, diamond_data, fitted_pre, client, epochs=3,
                            callbacks=[keras.callbacks.TerminateOnNaN()])
    assert len(history.history["loss"]) == 1


def test_same_seed_same_weights_whatever_the_scheduling(diamond_data, fitted_pre, client):
    """Where the scheduler puts partitions must not change what is trained: two fits with
    the same seed, data and number of workers end with the same weights."""
    import time

    ends = []
    for busy in (0.0, 3.0):  # the second fit starts with one worker busy: placement by load would differ
        first = sorted(client.nthreads())[0]
        hold = client.submit(time.sleep, busy, workers=[first], pure=False)
        model = build_model(len(fitted_pre.feature_names_))
        fit_averaging(model, diamond_data, fitted_pre, client, epochs=2)
        ends.append(model.get_weights())
        hold.result()
    for a, b in zip(*ends):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_after_interrupted_fit_matches_uninterrupted(diamond_data, fitted_pre, client, tmp_path):
    import keras

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt("simulated interruption")

    ckpt = str(tmp_path / "ckpt")
    first = build_model(len(fitted_pre.feature_names_))
    with pytest.raises(KeyboardInterrupt):
        fit_averaging(first, diamond_data, fitted_pre, client, epochs=4, checkpoint=ckpt, callbacks=[Interrupt()])
    saved = load_checkpoint(ckpt)
    assert saved.epoch == 1 and len(saved.history["loss"]) == 2

    resumed = build_model(len(fitted_pre.feature_names_), seed=123)  # other initial weights: overwritten
    h = fit_averaging(resumed, diamond_data, fitted_pre, client, epochs=4, checkpoint=ckpt, resume=True)
    assert len(h.history["loss"]) == 4
    straight = build_model(len(fitted_pre.feature_names_))
    h2 = fit_averaging(straight, diamond_data, fitted_pre, client, epochs=4)
    assert h.history["val_loss"][-1] == pytest.approx(h2.history["val_loss"][-1], rel=0.05)


def test_checkpoints_on_s3(diamond_data, fitted_pre, client, s3):
    model = build_model(len(fitted_pre.feature_names_))
    url = s3.url("run1")
    fit_averaging(model, diamond_data, fitted_pre, client, epochs=2, checkpoint=url,
                  storage_options=s3.storage_options)
    saved = load_checkpoint(url, s3.storage_options)
    assert saved.epoch == 1
    for w, s in zip(model.get_weights(), saved.weights):
        np.testing.assert_array_equal(w, s)
    assert s3.filesystem().exists(url + "/checkpoint.npz")


def test_worker_killed_mid_fit_does_not_hang(diamond_data, fitted_pre, own_client):
    import keras

    client = own_client
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]

    class KillDuringRound(keras.callbacks.Callback):
        # on_train_batch_begin runs after the round's tasks were submitted: they are in flight
        done = False

        def on_train_batch_begin(self, batch, logs=None):
            if not self.done and batch == 2:
                os.kill(pids[victim], signal.SIGKILL)
                self.done = True

    model = build_model(len(fitted_pre.feature_names_))
    killer = KillDuringRound()
    h = fit_averaging(model, diamond_data, fitted_pre, client, epochs=EPOCHS, callbacks=[killer])
    assert killer.done
    clean = build_model(len(fitted_pre.feature_names_))
    h_clean = fit_averaging(clean, diamond_data, fitted_pre, client, epochs=EPOCHS)
    assert h.history["val_loss"][-1] <= 1.05 * h_clean.history["val_loss"][-1]
    assert victim in h.daskml_summary["lost_workers"]


def test_every_worker_gone_is_a_clear_error_after_checkpoint(diamond_data, fitted_pre, own_client, tmp_path):
    import dask
    import keras

    client = own_client

    class RetireAll(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                client.cluster.scale(0)
                client.cluster.sync(client.cluster._correct_state)

    ckpt = str(tmp_path / "ckpt")
    model = build_model(len(fitted_pre.feature_names_))
    with dask.config.set({"daskml_scale.training.no-worker-timeout": 3}):
        with pytest.raises(WorkersLostError, match="Every worker is gone"):
            fit_averaging(model, diamond_data, fitted_pre, client, epochs=3, checkpoint=ckpt, callbacks=[RetireAll()])
    assert load_checkpoint(ckpt).epoch == 0


def test_bad_calls_are_clear(diamond_data, fitted_pre, client):
    import keras

    raw = keras.Sequential([keras.Input((len(fitted_pre.feature_names_),)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="compiled"):
        daskml_scale.fit(raw, diamond_data.ddf(), preprocessor=fitted_pre, client=client)
    model = build_model(len(fitted_pre.feature_names_))
    wrong = daskml_scale.Preprocessor(target="no_such_column", numeric=["carat"])
    with pytest.raises(MissingColumnError, match="no_such_column"):
        daskml_scale.fit(model, diamond_data.ddf(), preprocessor=wrong, client=client)
    empty = diamond_data.train.iloc[:0]
    with pytest.raises(DataError):
        daskml_scale.fit(model, empty, preprocessor=make_preprocessor(), client=client)
    with pytest.raises(ValueError, match="resume"):
        daskml_scale.fit(model, diamond_data.ddf(), preprocessor=fitted_pre, client=client, resume=True)


@pytest.mark.gpu
def test_gpu_workers_train_on_their_gpu(diamond_data, fitted_pre):
    if daskml_scale.cluster.visible_gpu_count() == 0:
        pytest.skip("no GPU on this machine")
    pytest.importorskip("dask_cuda")
    with daskml_scale.connect(gpus="all") as client:
        model = build_model(len(fitted_pre.feature_names_))
        h = fit_averaging(model, diamond_data, fitted_pre, client, epochs=1)
        assert h.history["loss"]
