"""The parameter server's direct TCP channel, in one process (real sockets on loopback)."""

from __future__ import annotations

import gc
import socket
import threading
import time

import numpy as np
import pytest

from daskml_scale.exceptions import TrainingError
from daskml_scale.training.channel import ChannelClient, ChannelServer, channel_host


class Owner:
    """Stands in for the actor: answers a push with weights derived from it."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int]] = []

    def handle(self, stream, chunk, gradients, rows, version, token=0):
        if rows < 0:
            raise ValueError("rows must not be negative")
        self.calls.append((stream, chunk, rows, version))
        return gradients * 2 + stream, version + 1, chunk % 2 == 0


def test_push_round_trip_carries_every_value():
    owner = Owner()
    server = ChannelServer("127.0.0.1", owner, "handle")
    grads = np.random.default_rng(0).standard_normal(6017).astype(np.float32)
    with ChannelClient(server.endpoint, timeout=10) as link:
        for chunk in range(3):
            weights, version, applied = link.push(1, chunk, grads, 256, 7 + chunk)
            np.testing.assert_array_equal(weights, grads * 2 + 1)
            assert (version, applied) == (8 + chunk, chunk % 2 == 0)
    assert owner.calls == [(1, 0, 256, 7), (1, 1, 256, 8), (1, 2, 256, 9)]
    server.close()


def test_concurrent_streams_each_get_their_answer():
    owner = Owner()
    server = ChannelServer("127.0.0.1", owner, "handle")
    errors: list[BaseException] = []

    def stream(s: int) -> None:
        try:
            with ChannelClient(server.endpoint, timeout=10) as link:
                for chunk in range(50):
                    g = np.full(100, chunk, np.float32)
                    w, _, _ = link.push(s, chunk, g, 1, 0)
                    np.testing.assert_array_equal(w, g * 2 + s)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(owner.calls) == 200
    server.close()


def test_a_refused_push_raises_in_the_task_and_the_link_goes_on():
    owner = Owner()
    server = ChannelServer("127.0.0.1", owner, "handle")
    with ChannelClient(server.endpoint, timeout=10) as link:
        with pytest.raises(TrainingError, match="rows must not be negative"):
            link.push(0, 0, np.zeros(4, np.float32), -1, 0)
        weights, version, _ = link.push(0, 1, np.ones(4, np.float32), 1, 3)
        np.testing.assert_array_equal(weights, np.full(4, 2, np.float32))
        assert version == 4
    server.close()


def test_a_closed_server_is_an_error_not_a_hang():
    owner = Owner()
    server = ChannelServer("127.0.0.1", owner, "handle")
    link = ChannelClient(server.endpoint, timeout=10)
    link.push(0, 0, np.zeros(4, np.float32), 1, 0)
    server.close()
    with pytest.raises(OSError):
        for chunk in range(1, 4):  # the first send after a reset may still be buffered
            link.push(0, chunk, np.zeros(4, np.float32), 1, 0)
    link.close()


def test_the_channel_closes_when_its_owner_is_gone():
    owner = Owner()
    address = ChannelServer("127.0.0.1", owner, "handle").address
    del owner
    gc.collect()
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
        except OSError:
            break  # refused: nothing listens any more
        assert time.monotonic() < deadline, "the channel still listens after its owner was collected"
        time.sleep(0.05)
    while any(t.name == "daskml-ps-channel" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the channel's thread outlives its owner"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "address, host",
    [("tcp://127.0.0.1:4321", "127.0.0.1"), ("tcp://10.1.2.3:1", "10.1.2.3"), ("tls://127.0.0.1:4321", None),
     ("inproc://10.0.0.1/1/2", None), (None, None)],
)
def test_channel_host_only_for_plain_tcp(address, host):
    assert channel_host(address) == host


def test_an_unreachable_channel_means_actor_calls_not_a_failure(caplog):
    """A firewall may let only Dask's ports through: the task then pushes as actor calls."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    address = (*closed.getsockname(), bytes(32))
    closed.close()  # nothing listens there now
    with caplog.at_level("WARNING", logger="daskml_scale.training.channel"):
        assert ChannelClient.open(address, timeout=10) is None
    assert "cannot be reached" in caplog.text
    assert ChannelClient.open(None, timeout=10) is None
    owner = Owner()
    server = ChannelServer("127.0.0.1", owner, "handle")
    link = ChannelClient.open(server.endpoint, timeout=10)
    assert link is not None
    link.close()
    server.close()


def test_a_stranger_is_hung_up_on_and_the_streams_go_on():
    owner = Owner()
    server = ChannelServer("127.0.0.1", owner, "handle", max_values=1000)
    with ChannelClient(server.endpoint, timeout=10) as link:
        wrong_secret = b"DKS1" + bytes(32) + b"DKP2" + b"\0" * 48  # the right magic, another secret
        no_hello = b"DKP2" + b"\0" * 56  # a well-formed push with no handshake first
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 40, b"DKP2" + b"\xff" * 96, wrong_secret, no_hello):
            stranger = socket.create_connection(server.address, timeout=5)
            stranger.sendall(junk)
            try:
                answer = stranger.recv(64)
            except ConnectionResetError:  # closed with unread bytes: a reset
                answer = b""
            assert answer == b""  # closed, nothing answered
            stranger.close()
        too_many = np.zeros(1001, np.float32)  # more values than the server takes
        with pytest.raises(OSError):
            link.push(0, 0, too_many, 1, 0)
    with ChannelClient(server.endpoint, timeout=10) as link:
        weights, _, _ = link.push(0, 0, np.ones(1000, np.float32), 1, 0)
        assert weights.shape == (1000,)
    server.close()


def test_large_messages_cross_whole():
    owner = Owner()
    server = ChannelServer("127.0.0.1", owner, "handle")
    big = np.random.default_rng(1).standard_normal(3_000_000).astype(np.float32)  # 12 MB each way
    with ChannelClient(server.endpoint, timeout=30) as link:
        weights, _, _ = link.push(2, 0, big, 1, 0)
    np.testing.assert_array_equal(weights, big * 2 + 2)
    server.close()


def test_a_cut_off_message_is_an_error_never_data():
    """A pushing task killed between the header and the gradients: the server must not
    take the uninitialised buffer as gradients; a task must not take half an answer as weights."""
    import struct

    owner = Owner()
    server = ChannelServer("127.0.0.1", owner, "handle", max_values=10_000)
    head = struct.pack("<4sqqqqqq", b"DKP2", 0, 0, 1, 0, 0, 1000)
    for tail in (b"", b"\0" * 100):  # nothing, or part of the 4000 bytes announced
        s = socket.create_connection(server.address, timeout=5)
        s.sendall(b"DKS1" + server.secret + head + tail)  # past the handshake: the message itself is cut
        s.close()
    time.sleep(0.2)
    assert owner.calls == []
    server.close()

    # a server that answers with a header only, then hangs up
    listener = socket.create_server(("127.0.0.1", 0))

    def half_answer() -> None:
        conn, _ = listener.accept()
        want, got = 36 + struct.calcsize("<4sqqqqqq") + 4 * 4, 0  # the handshake, then the whole push
        while got < want:
            got += len(conn.recv(1 << 16)) or want  # (a close ends the wait)
        conn.sendall(struct.pack("<qqqq", 0, 1, 1, 1000))
        conn.close()

    t = threading.Thread(target=half_answer)
    t.start()
    with ChannelClient((*listener.getsockname(), bytes(32)), timeout=10) as link:
        with pytest.raises(ConnectionError, match="middle of a message"):
            link.push(0, 0, np.zeros(4, np.float32), 1, 0)
    t.join(5)
    listener.close()


def _actor(mode: str = "sync"):
    """The real ParamServerActor, in this process (no worker: no channel)."""
    from daskml_scale import backend
    from daskml_scale.training.parameter_server import ParamServerActor
    from tests.training.conftest import build_model

    model = build_model(3)
    X = np.ones((4, 3), np.float32)
    backend.ensure_built(model, X, X[:, 0])
    actor = ParamServerActor(backend.model_to_bytes(model), mode, None, 10.0, direct=False)
    actor.load(backend.get_weights(model), None, [0, 1])
    return actor


def test_superseded_tasks_are_fenced_off():
    """A stream's task rerun elsewhere gets a new token: the old task's pushes and its
    done() are refused, so no chunk counts twice and the barrier keeps waiting for the stream."""
    actor = _actor("sync")
    n = actor._grad_size
    _, _, _, _, old = actor.begin(0)
    _, _, _, _, new = actor.begin(0)  # the rerun
    _, _, _, _, other = actor.begin(1)
    with pytest.raises(TrainingError, match="superseded"):
        actor._push(0, 0, np.zeros(n, np.float32), 10, 0, old)
    actor.done(0, old)  # ignored: stream 0 still takes part in the barrier
    results: list = []
    t = threading.Thread(target=lambda: results.append(actor._push(0, 0, np.ones(n, np.float32), 10, 0, new)))
    t.start()
    time.sleep(0.2)
    assert not results and actor.version == 0  # waits for stream 1
    _, version, applied = actor._push(1, 0, np.ones(n, np.float32), 10, 0, other)
    t.join(5)
    assert (version, applied) == (1, True) and results[0][1] == 1
    assert actor.stats["applied"] == 1


def test_a_new_epoch_or_close_releases_waiting_pushes():
    actor = _actor("sync")
    n = actor._grad_size
    _, _, _, _, token = actor.begin(0)
    errors: list = []

    def push() -> None:
        try:
            actor._push(0, 0, np.ones(n, np.float32), 10, 0, token)
        except TrainingError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=push)
    t.start()
    time.sleep(0.2)
    actor.load(actor._current(), None, [0, 1])  # a new epoch: the old push gives up
    t.join(5)
    assert not t.is_alive() and "new epoch" in errors[0]
    _, _, _, _, token = actor.begin(0)
    t = threading.Thread(target=push)
    t.start()
    time.sleep(0.2)
    actor.close()
    t.join(5)
    assert not t.is_alive() and len(errors) == 2
    with pytest.raises(TrainingError, match="closed"):
        actor._push(0, 1, np.ones(n, np.float32), 10, 0, token)
