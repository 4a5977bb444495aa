"""fit() with AllReduce on a real LocalCluster (2 worker processes x 1 thread), and the
ring of direct worker-to-worker connections it reduces over."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
import time

import dask.dataframe as dd
import numpy as np
import pytest

import daskml_scale
from daskml_scale.training.ring import Ring, RingError, close_port, open_port
from tests.training.conftest import build_model, normalized_model, single_process_sgd

BATCH = 128


def small_model(n_features: int, seed: int = 0):
    import keras

    with daskml_scale.seeded(seed):
        model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    return model


@pytest.mark.slow
def test_every_1_is_single_process_sgd_on_the_union_of_batches(diamond_data, fitted_pre, client):
    # uneven partitions: the shorter stream runs out first and takes part with no rows
    rows = diamond_data.train.iloc[:3100]
    ddf = dd.from_pandas(rows, npartitions=2)
    epochs = 2
    n = len(fitted_pre.feature_names_)
    model, expected = small_model(n), small_model(n)  # same seed: same initial weights
    h = daskml_scale.fit(model, ddf, preprocessor=fitted_pre, epochs=epochs, batch_size=BATCH, client=client,
                         shuffle=False, verbose=0, strategy=daskml_scale.AllReduce(every=1))
    parts = [fitted_pre.transform(ddf.partitions[i].compute()) for i in range(2)]
    steps = single_process_sgd(expected, parts, BATCH, epochs)
    for got, want in zip(model.get_weights(), expected.get_weights()):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # the optimizer state came back too: Adam's step count is one per global step
    assert int(model.optimizer.iterations.numpy()) == epochs * steps
    assert h.history["allreduce_steps"] == [steps] * epochs
    # a reduce sends 2 (N-1)/N of the gradients (+ the row count) per worker, N = 2
    size = sum(int(np.prod(w.shape)) for w in model.trainable_weights) + 1
    assert h.history["allreduce_mb_sent"][0] * 1e6 == pytest.approx(steps * (size * 4 + 2 * 16), rel=0.01)
    assert h.daskml_summary["strategy"] == "allreduce"


@pytest.mark.slow
def test_every_k_averages_weights_and_learns(diamond_data, fitted_pre, client):
    n = len(fitted_pre.feature_names_)
    h = daskml_scale.fit(build_model(n), diamond_data.ddf(), preprocessor=fitted_pre, epochs=3, batch_size=BATCH,
                         client=client, verbose=0, validation_data=diamond_data.val_ddf(),
                         strategy=daskml_scale.AllReduce(every=8))
    per_worker = int(np.ceil(12_000 / BATCH / 8))
    assert h.history["allreduce_steps"][0] == pytest.approx(per_worker, abs=1)
    assert h.history["val_loss"][-1] < 0.5 * h.history["val_loss"][0]
    avg = daskml_scale.fit(build_model(n), diamond_data.ddf(), preprocessor=fitted_pre, epochs=3, batch_size=BATCH,
                           client=client, verbose=0, validation_data=diamond_data.val_ddf(),
                           strategy=daskml_scale.ModelAveraging(sync_every=8))
    # the same local SGD as driver averaging every 8 steps, without the driver in the loop
    assert h.history["val_loss"][-1] <= 1.1 * avg.history["val_loss"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("held_out", [False, True], ids=["validation_data", "validation_fraction"])
def test_the_ranks_validate_at_the_epochs_final_weights(diamond_data, fitted_pre, client, held_out):
    """The epoch's tasks validate their rows themselves (no validation tasks of the
    driver's), at the weights the driver keeps: Keras's own evaluate agrees."""
    from distributed import get_task_stream

    n = len(fitted_pre.feature_names_)
    model = build_model(n)
    extra = dict(validation_fraction=0.2) if held_out else dict(validation_data=diamond_data.val_ddf())
    with get_task_stream(client) as ts:
        h = daskml_scale.fit(model, diamond_data.ddf(), preprocessor=fitted_pre, epochs=2, batch_size=BATCH,
                             client=client, verbose=0, strategy=daskml_scale.AllReduce(every=8), **extra)
    keys = [str(t["key"]) for t in ts.data]
    assert any("daskml-allreduce" in k for k in keys)
    assert not [k for k in keys if "daskml-validate" in k]
    if held_out:
        rows = h.daskml_summary["validation_rows"]
        assert 0.15 * 24_000 < rows < 0.25 * 24_000
        assert len(h.history["val_loss"]) == 2
        return
    Xv, yv = fitted_pre.transform(diamond_data.val)
    want = model.evaluate(Xv, yv, batch_size=1024, verbose=0, return_dict=True)
    assert h.history["val_loss"][-1] == pytest.approx(want["loss"], rel=1e-4)
    assert h.history["val_mae"][-1] == pytest.approx(want["mae"], rel=1e-4)


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_does_not_hang(diamond_data, fitted_pre, own_client):
    import keras

    n = len(fitted_pre.feature_names_)
    # small batches: an epoch of ~375 reduces outlasts the kill's delay
    common = dict(preprocessor=fitted_pre, epochs=3, batch_size=32, verbose=0,
                  validation_data=diamond_data.val_ddf(), strategy=daskml_scale.AllReduce(every=1))
    calm = daskml_scale.fit(build_model(n), diamond_data.ddf(), client=own_client, **common)

    class Kill(keras.callbacks.Callback):
        victim = None

        def on_train_batch_begin(self, batch, logs=None):  # the second epoch's tasks are in flight
            if self.victim is None and len(self.model.history.history.get("loss", [])) == 1:
                self.victim = sorted(own_client.nthreads())[0]
                pid = own_client.run(os.getpid, workers=[self.victim])[self.victim]
                threading.Timer(0.1, os.kill, (pid, signal.SIGKILL)).start()

    killer = Kill()
    t = time.monotonic()
    h = daskml_scale.fit(build_model(n), diamond_data.ddf(), client=own_client, callbacks=[killer], **common)
    assert time.monotonic() - t < 300
    assert killer.victim in h.daskml_summary["lost_workers"]
    assert h.history["allreduce_restarts"][1] >= 1  # the epoch restarted from the driver's copy
    assert h.history["allreduce_restarts"][0] == 0
    assert len(h.history["val_loss"]) == 3
    assert h.history["val_loss"][-1] <= 1.05 * calm.history["val_loss"][-1]


@pytest.mark.slow
def test_a_connection_without_the_secret_is_closed_unanswered(client):
    """Ring members on two workers reduce; a stranger at a member's port gets nothing."""
    workers = sorted(client.nthreads())
    ring_id, secret = f"test-{secrets.token_hex(4)}", secrets.token_bytes(32)
    opened = [client.submit(open_port, ring_id, r, workers=[w], pure=False).result(timeout=30)
              for r, w in enumerate(workers)]
    addresses = [(h, p) for _, h, p in opened]

    # a stranger connects first, with a wrong secret, and is closed without an answer
    stranger = socket.create_connection(addresses[0], timeout=10)
    stranger.sendall(b"DKR1" + b"\0" * 32 + (1).to_bytes(8, "little", signed=True) + bytes(8))

    def member(rank, values):
        ring = Ring(ring_id, rank, addresses, secret, timeout=20)
        try:
            return ring.allreduce(np.asarray(values, np.float32)).tolist()
        finally:
            ring.close()

    futs = [client.submit(member, r, [r + 1.0] * 5, workers=[w], pure=False) for r, w in enumerate(workers)]
    assert [f.result(timeout=60) for f in futs] == [[3.0] * 5, [3.0] * 5]
    stranger.settimeout(10)
    assert stranger.recv(1) == b""  # closed, nothing sent
    stranger.close()
    # a formed ring closed its listening ports: nobody else can knock
    for address in addresses:
        with pytest.raises(OSError):
            socket.create_connection(address, timeout=5).close()

    # a member with the wrong secret never joins: its neighbour's wait ends, with an error
    opened = [client.submit(open_port, ring_id, r, workers=[w], pure=False).result(timeout=30)
              for r, w in enumerate(workers)]
    addresses = [(h, p) for _, h, p in opened]
    bad = [client.submit(member if r == 0 else _member_with_secret, *((r, [1.0]) if r == 0 else
                         (ring_id, r, addresses, secrets.token_bytes(32))), workers=[w], pure=False)
           for r, w in enumerate(workers)]
    with pytest.raises(RingError):
        bad[0].result(timeout=120)
    client.cancel(bad)
    client.run(close_port, ring_id)


def _member_with_secret(ring_id, rank, addresses, secret):
    ring = Ring(ring_id, rank, addresses, secret, timeout=5)
    try:
        return ring.allreduce(np.ones(1, np.float32)).tolist()
    finally:
        ring.close()


def test_ring_of_one_is_the_identity():
    ring = Ring("solo", 0, [("127.0.0.1", 1)], secrets.token_bytes(32), timeout=1)
    v = np.arange(4, dtype=np.float32)
    assert ring.allreduce(v.copy()).tolist() == v.tolist()


def test_a_ring_that_cannot_form_fails_fast():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()  # nothing listens there
    from daskml_scale.training import ring as ring_module

    port = ring_module._Port("127.0.0.1", None)
    ring_module._PORTS.put(("unreachable", 0), port)
    t = time.monotonic()
    with pytest.raises(RingError, match="connect"):
        Ring("unreachable", 0, [port.address, address], secrets.token_bytes(32), timeout=60, connect_timeout=1)
    assert time.monotonic() - t < 10
    ring_module.close_port("unreachable")


class _NoRing(daskml_scale.AllReduce):
    """AllReduce on a cluster whose workers cannot reach each other."""

    def _attempt(self, *args, **kwargs):
        raise RingError("Could not connect to the ring member at 10.0.0.1:1 (a firewall)", peer="10.0.0.1:1")


@pytest.mark.slow
def test_a_ring_that_cannot_form_falls_back(diamond_data, fitted_pre, client):
    n = len(fitted_pre.feature_names_)
    fallback = daskml_scale.ModelAveraging(sync_every=16)
    h = daskml_scale.fit(build_model(n), diamond_data.ddf(), preprocessor=fitted_pre, epochs=2, batch_size=BATCH,
                         client=client, verbose=0, strategy=_NoRing(every=16, fallback=fallback))
    assert h.history["allreduce_fallback"] == [1.0, 1.0]
    assert h.daskml_summary["fallback"]["strategy"] == "averaging"
    assert h.history["loss"][-1] < h.history["loss"][0]
    with pytest.raises(daskml_scale.TrainingError, match="AllReduce failed"):
        daskml_scale.fit(build_model(n), diamond_data.ddf(), preprocessor=fitted_pre, epochs=1, batch_size=BATCH,
                         client=client, verbose=0, strategy=_NoRing(every=16))


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="every"):
        daskml_scale.AllReduce(every=0)
    with pytest.raises(ValueError, match="outer_lr"):
        daskml_scale.AllReduce(every=1, outer_lr=1.5)


@pytest.mark.slow
def test_on_a_tls_cluster_the_ring_speaks_tls(diamond_data, fitted_pre, tmp_path):
    """Two TLS-only workers: the ring's connections use the workers' certificates, and the
    result is the same model as on a tcp:// cluster."""
    from tests.conftest import ProcessCluster, make_tls_files

    cluster = ProcessCluster(tmp_path, n_workers=2, tls=make_tls_files(tmp_path))
    try:
        cluster.wait_for_workers(2)
        n = len(fitted_pre.feature_names_)
        ddf = dd.from_pandas(diamond_data.train.iloc[:2000], npartitions=2)
        with daskml_scale.connect(cluster.address, security=cluster.security()) as c:
            assert all(w.startswith("tls://") for w in c.nthreads())
            model = small_model(n)
            h = daskml_scale.fit(model, ddf, preprocessor=fitted_pre, epochs=1, batch_size=BATCH, client=c,
                                 verbose=0, shuffle=False, strategy=daskml_scale.AllReduce(every=1))
            tls_seen = c.run(_ring_used_tls)
        assert h.history["allreduce_steps"] == [np.ceil(1000 / BATCH)]
        assert h.history["allreduce_mb_sent"][0] > 0
        assert any(tls_seen.values())
        parts = [fitted_pre.transform(ddf.partitions[i].compute()) for i in range(2)]
        expected = small_model(n)
        single_process_sgd(expected, parts, BATCH, 1)
        for got, want in zip(model.get_weights(), expected.get_weights()):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    finally:
        cluster.close()


def _ring_used_tls():
    from daskml_scale.training import ring

    return ring.TLS_RINGS[0] > 0


def test_joined_ranges_give_the_same_steps_as_the_blocks(monkeypatch):
    """A worker gathers adjacent ranges of its shuffled stream at once: the steps cut
    from them are the rows, in the order, that block by block gave; a byte budget keeps
    the gathers bounded."""
    from daskml_scale.training import allreduce
    from daskml_scale.training.worker import StreamRange

    rng = np.random.default_rng(0)
    sources = {p: {"X": rng.random((n, 3), dtype=np.float32), "y": rng.random(n, dtype=np.float32)}
               for p, n in [(0, 700), (2, 450)]}
    total, step = 1150, 64
    blocks = [[StreamRange((0, 2), a, min(a + 4 * step, total), 1)] for a in range(0, total, 4 * step)]

    def steps(budget):
        monkeypatch.setattr(allreduce, "_BLOCK_BYTES", budget)
        return list(allreduce._steps(blocks, sources, 7, 3, True, step, 20))

    one_by_one, joined = steps(0), steps(32 << 20)
    assert len(allreduce._coalesced(blocks, sources)) == 1
    assert len(one_by_one) == len(joined) == 20  # 18 steps of rows, then 2 empty ones
    for (xa, ya), (xb, yb) in zip(one_by_one, joined):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    monkeypatch.setattr(allreduce, "_BLOCK_BYTES", 16 * 2 * 4 * step)  # two blocks' rows at most
    assert len(allreduce._coalesced(blocks, sources)) == 3


@pytest.mark.parametrize("strategy", ["default", "gossip"])
def test_a_model_with_integer_weights_trains_with_local_sgd(diamond_data, fitted_pre, client, strategy):
    """A Normalization layer (common in Keras code) holds an int64 count among its weights:
    the default strategy (local SGD with an outer step) and Gossip carry it through their
    float32 state vector and give it back as the integer it was."""
    model = normalized_model(len(fitted_pre.feature_names_))
    ints = [i for i, v in enumerate(model.weights) if v.dtype != "float32"]
    before = [np.asarray(w) for w in model.get_weights()]
    chosen = None if strategy == "default" else daskml_scale.Gossip(every=8)
    h = daskml_scale.fit(model, diamond_data.ddf(), preprocessor=fitted_pre, epochs=2, batch_size=BATCH,
                         client=client, verbose=0, strategy=chosen)
    assert "allreduce_fallback" not in h.history
    assert h.history["loss"][1] < h.history["loss"][0] and np.isfinite(h.history["loss"][1])
    after = model.get_weights()
    for i in ints:
        assert after[i].dtype == before[i].dtype and np.array_equal(after[i], before[i])
