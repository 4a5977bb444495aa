"""fit() with ParameterServer on a real LocalCluster (2 worker processes x 1 thread)."""

from __future__ import annotations

import os
import signal
import threading
import time

import dask.dataframe as dd
import numpy as np
import pytest

import daskml_scale
from daskml_scale.training.ps_actor import ParamServerActor
from tests.training.conftest import build_model, normalized_model, single_process_sgd

pytestmark = pytest.mark.slow

BATCH = 128


def small_model(n_features: int, seed: int = 0):
    import keras

    with daskml_scale.seeded(seed):
        model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.9), loss="mse")
    return model


def test_sync_push_every_1_is_large_batch_sgd(diamond_data, fitted_pre, client):
    """Two workers, one partition each, no shuffle: each server step must be the
    optimizer applied to the mean of the two workers' batch gradients."""
    rows = diamond_data.train.iloc[:3000]
    ddf = dd.from_pandas(rows, npartitions=2)
    batch, epochs = 64, 2
    n = len(fitted_pre.feature_names_)
    model = small_model(n)
    expected = small_model(n)  # same seed: same initial weights
    h = daskml_scale.fit(model, ddf, preprocessor=fitted_pre, epochs=epochs, batch_size=batch, client=client,
                         shuffle=False, verbose=0, strategy=daskml_scale.ParameterServer("sync", push_every=1))

    parts = [fitted_pre.transform(ddf.partitions[i].compute()) for i in range(2)]
    steps = single_process_sgd(expected, parts, batch, epochs)
    for got, want in zip(model.get_weights(), expected.get_weights()):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # the server's optimizer state came back too (momentum slots, step count)
    assert int(model.optimizer.iterations.numpy()) == epochs * steps
    assert h.history["ps_applied"] == [steps] * epochs
    assert h.history["ps_rejected"] == [0.0] * epochs
    assert h.daskml_summary["mode"] == "sync"


def test_async_reaches_model_averaging_quality(diamond_data, fitted_pre, client):
    epochs = 3
    n = len(fitted_pre.feature_names_)
    common = dict(preprocessor=fitted_pre, epochs=epochs, batch_size=BATCH, client=client, verbose=0,
                  validation_data=diamond_data.val_ddf())
    ps = daskml_scale.fit(build_model(n), diamond_data.ddf(), strategy=daskml_scale.ParameterServer("async"), **common)
    avg = daskml_scale.fit(build_model(n), diamond_data.ddf(),
                           strategy=daskml_scale.ModelAveraging(sync_every=16), **common)
    ours, theirs = ps.history["val_loss"][-1], avg.history["val_loss"][-1]
    assert ours <= 1.05 * theirs, (ours, theirs)
    steps = int(np.ceil(12_000 / BATCH))
    assert ps.history["ps_applied"][-1] == pytest.approx(2 * steps, abs=2)
    assert ps.history["ps_rejected"] == [0.0] * epochs  # no bound: every push applied


def test_staleness_bound_rejects_stale_pushes(diamond_data, fitted_pre, client):
    n = len(fitted_pre.feature_names_)
    pushes = 2 * int(np.ceil(12_000 / BATCH))
    h = daskml_scale.fit(build_model(n), diamond_data.ddf(), preprocessor=fitted_pre, epochs=1, batch_size=BATCH,
                         client=client, verbose=0, strategy=daskml_scale.ParameterServer("async", max_staleness=0))
    applied, rejected = h.history["ps_applied"][0], h.history["ps_rejected"][0]
    assert rejected > 0 and applied > 0
    assert applied + rejected == pytest.approx(pushes, abs=2)
    assert h.history["ps_staleness_max"][0] == 0  # nothing older than the bound was applied

    loose = daskml_scale.fit(build_model(n), diamond_data.ddf(), preprocessor=fitted_pre, epochs=1, batch_size=BATCH,
                             client=client, verbose=0, strategy=daskml_scale.ParameterServer("async", max_staleness=1))
    assert loose.history["ps_staleness_max"][0] <= 1


def _kill_mid_epoch(client, *, actor_host: bool):
    """A callback that SIGKILLs, 0.05 s into the second epoch's tasks, the worker that hosts
    the parameter server's actor (``actor_host=True``) or the other one; ``victim`` names it."""
    import keras

    def hosts_server(dask_worker):
        return any("daskml-ps-server" in str(k) for k in dask_worker.state.actors)

    class Kill(keras.callbacks.Callback):
        # on_train_batch_begin runs once the epoch's tasks were submitted: they are in flight
        victim = None

        def on_train_batch_begin(self, batch, logs=None):
            if self.victim is None and len(self.model.history.history.get("loss", [])) == 1:
                chosen = [w for w, yes in client.run(hosts_server).items() if yes == actor_host]
                pid = client.run(os.getpid, workers=chosen)[chosen[0]]
                self.victim = chosen[0]
                # soon after the tasks start: an epoch of ~90 pushes per worker lasts longer
                threading.Timer(0.05, os.kill, (pid, signal.SIGKILL)).start()

    return Kill()


def test_server_worker_killed_mid_fit_does_not_hang(diamond_data, fitted_pre, own_client):
    n = len(fitted_pre.feature_names_)
    killer = _kill_mid_epoch(own_client, actor_host=True)
    h = daskml_scale.fit(build_model(n), diamond_data.ddf(), preprocessor=fitted_pre, epochs=3, batch_size=BATCH,
                         client=own_client, verbose=0, validation_data=diamond_data.val_ddf(), callbacks=[killer],
                         strategy=daskml_scale.ParameterServer("async", push_every=1))
    assert killer.victim is not None
    assert len(h.history["val_loss"]) == 3
    assert h.history["val_loss"][-1] < h.history["val_loss"][0]
    assert killer.victim in h.daskml_summary["lost_workers"]
    assert sum(h.history["ps_restarts"]) >= 1  # the server was restored on the other worker


def test_other_worker_killed_mid_fit_sync_barrier_goes_on(diamond_data, fitted_pre, own_client):
    """The worker that does not host the actor dies mid-epoch in sync mode: its epoch task is
    rerun on the survivor, resumes after the last chunk the actor received, and the barrier
    (which waited for it) goes on; the server is not restarted."""
    n = len(fitted_pre.feature_names_)
    killer = _kill_mid_epoch(own_client, actor_host=False)
    h = daskml_scale.fit(build_model(n), diamond_data.ddf(), preprocessor=fitted_pre, epochs=3, batch_size=BATCH,
                         client=own_client, verbose=0, validation_data=diamond_data.val_ddf(), callbacks=[killer],
                         strategy=daskml_scale.ParameterServer("sync", push_every=1))
    assert killer.victim is not None
    assert killer.victim in h.daskml_summary["lost_workers"]
    assert h.history["ps_restarts"] == [0.0, 0.0, 0.0]
    # every chunk of both streams went into exactly one step: none lost, none pushed twice
    assert h.history["ps_applied"] == [np.ceil(12_000 / BATCH)] * 3
    assert len(h.history["val_loss"]) == 3 and np.isfinite(h.history["val_loss"][-1])
    assert h.history["val_loss"][-1] < h.history["val_loss"][0]


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="mode"):
        daskml_scale.ParameterServer("hogwild")
    with pytest.raises(ValueError, match="push_every"):
        daskml_scale.ParameterServer(push_every=0)
    with pytest.raises(ValueError, match="max_staleness"):
        daskml_scale.ParameterServer("async", max_staleness=-1)


def test_packed_messages_match_lists():
    """Gradients and weights travel packed (one float32 vector): same numbers as the lists."""
    from daskml_scale import backend

    model = build_model(5)
    X = np.random.default_rng(0).random((300, 5)).astype(np.float32)
    y = X.sum(axis=1).astype(np.float32)
    backend.ensure_built(model, X, y)
    weights = backend.get_weights(model)
    packed = backend.pack(weights)
    assert isinstance(packed, np.ndarray) and packed.size == sum(w.size for w in weights)
    for a, b in zip(backend.unpack(packed, [w.shape for w in weights]), weights):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="packed values"):
        backend.unpack(packed[:-1], [w.shape for w in weights])
    assert isinstance(backend.pack([np.zeros(2, np.float64)]), list)  # other dtypes stay a list
    fn = backend.make_gradient_loop_fn(model)
    for rows in (300, 100):  # several batches (a loop in the graph), and one batch (none)
        g_list, m_list = fn(X[:rows], y[:rows], 128, weights)
        g_packed, m_packed = fn(X[:rows], y[:rows], 128, packed)
        np.testing.assert_allclose(g_packed, backend.pack(g_list), rtol=1e-6, atol=1e-7)
        for a, b in zip(m_list, m_packed):
            for u, v in zip(a, b):
                np.testing.assert_allclose(u, v, rtol=1e-6)


def test_weights_that_cannot_be_packed(diamond_data, fitted_pre, client):
    """A Normalization layer holds an int64 count: weights travel as lists, gradients packed."""
    model = normalized_model(len(fitted_pre.feature_names_))
    for mode in ("sync", "async"):
        h = daskml_scale.fit(model, diamond_data.ddf(), preprocessor=fitted_pre, epochs=1, batch_size=BATCH,
                             client=client, verbose=0, strategy=daskml_scale.ParameterServer(mode, push_every=8))
        assert h.history["ps_applied"][0] > 0 and np.isfinite(h.history["loss"][0])


def _servers_left(client) -> dict[str, tuple[int, int]]:
    """Per worker: parameter-server actors, and channel threads still running."""
    def count(dask_worker) -> tuple[int, int]:
        actors = sum("daskml-ps-server" in str(k) for k in dask_worker.state.actors)
        return actors, sum(t.name == "daskml-ps-channel" and t.is_alive() for t in threading.enumerate())

    return {w: c for w, c in client.run(count).items() if any(c)}


def test_direct_channel_and_actor_calls_train_the_same_model(diamond_data, fitted_pre, client):
    """Sync pushes over the direct TCP channel and as actor calls: the same steps, the
    same weights; the History says which way they went; no channel outlives its fit."""
    import dask

    n = len(fitted_pre.feature_names_)
    ddf = dd.from_pandas(diamond_data.train.iloc[:4000], npartitions=2)
    common = dict(preprocessor=fitted_pre, epochs=2, batch_size=BATCH, client=client, shuffle=False, verbose=0,
                  strategy=daskml_scale.ParameterServer("sync", push_every=2))
    direct_model, actor_model = small_model(n), small_model(n)
    direct = daskml_scale.fit(direct_model, ddf, **common)
    with dask.config.set({"daskml_scale.training.ps-direct": False}):
        actor = daskml_scale.fit(actor_model, ddf, **common)
    pushes = int(np.ceil(2000 / BATCH / 2)) * 2  # per epoch: both streams, one push per 2 batches
    assert direct.history["ps_direct_pushes"] == [pushes] * 2
    assert actor.history["ps_direct_pushes"] == [0] * 2
    assert direct.history["ps_applied"] == actor.history["ps_applied"]
    for a, b in zip(direct_model.get_weights(), actor_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    deadline = time.monotonic() + 10
    while _servers_left(client):  # the actor and its channel go with the fit (no garbage cycle keeps them)
        assert time.monotonic() < deadline, _servers_left(client)
        time.sleep(0.2)


def test_tls_cluster_pushes_through_actor_calls(diamond_data, fitted_pre, tls_cluster):
    """A raw socket would bypass TLS: on a tls:// cluster every push is an actor call."""
    n = len(fitted_pre.feature_names_)
    ddf = dd.from_pandas(diamond_data.train.iloc[:2000], npartitions=2)
    with daskml_scale.connect(tls_cluster.address, security=tls_cluster.security()) as c:
        h = daskml_scale.fit(small_model(n), ddf, preprocessor=fitted_pre, epochs=1, batch_size=BATCH, client=c,
                             verbose=0, strategy=daskml_scale.ParameterServer("async"))
    assert h.history["ps_applied"][0] == np.ceil(2000 / BATCH)
    assert h.history["ps_direct_pushes"] == [0]
    assert np.isfinite(h.history["loss"][0])


def test_async_local_steps_keep_the_updates_of_an_epoch(diamond_data, fitted_pre, client):
    """push_every=8 in async mode: each worker applies its 8 steps itself and pushes the
    change (Downpour), so an epoch still makes one update per batch; pushing the mean
    gradient of 8 batches instead makes one eighth of them, and learns less per epoch."""
    epochs, n = 3, len(fitted_pre.feature_names_)
    common = dict(preprocessor=fitted_pre, epochs=epochs, batch_size=BATCH, client=client, verbose=0,
                  validation_data=diamond_data.val_ddf())
    local = daskml_scale.fit(build_model(n), diamond_data.ddf(),
                             strategy=daskml_scale.ParameterServer("async", push_every=8), **common)
    mean = daskml_scale.fit(build_model(n), diamond_data.ddf(),
                            strategy=daskml_scale.ParameterServer("async", push_every=8, local_steps=False), **common)
    avg = daskml_scale.fit(build_model(n), diamond_data.ddf(),
                           strategy=daskml_scale.ModelAveraging(sync_every=16), **common)
    assert local.daskml_summary["local_steps"] is True and mean.daskml_summary["local_steps"] is False
    pushes = 2 * int(np.ceil(12_000 / BATCH / 8))
    assert local.history["ps_applied"][-1] == pytest.approx(pushes, abs=2)
    assert local.history["val_loss"][-1] < mean.history["val_loss"][-1]
    assert local.history["val_loss"][-1] <= 1.05 * avg.history["val_loss"][-1]
    # the workers' own optimizers moved: their slots come back averaged, with the steps counted
    assert int(local.model.optimizer.iterations.numpy()) > epochs * 12_000 / BATCH / 2 - 10


class _RaisingActor(ParamServerActor):
    """A server whose optimizer step fails (e.g. a bug in a custom optimizer)."""

    def _step(self, gradients):
        raise ValueError("injected failure in the server's step")


class _RaisingPS(daskml_scale.ParameterServer):
    actor_class = _RaisingActor


@pytest.mark.parametrize("direct", [True, False])
def test_an_error_inside_the_server_reaches_the_user_with_its_cause(diamond_data, fitted_pre, client, direct):
    """Not a lost worker: the server is not restarted, and the error says what failed."""
    import dask

    n = len(fitted_pre.feature_names_)
    ddf = dd.from_pandas(diamond_data.train.iloc[:2000], npartitions=2)
    t = time.monotonic()
    with dask.config.set({"daskml_scale.training.ps-direct": direct}):
        with pytest.raises(Exception, match="injected failure in the server's step") as info:
            daskml_scale.fit(small_model(n), ddf, preprocessor=fitted_pre, epochs=1, batch_size=BATCH, client=client,
                             verbose=0, strategy=_RaisingPS("async"))
    assert time.monotonic() - t < 60  # no restarts of a server that was never lost
    assert "lost" not in str(info.value)
