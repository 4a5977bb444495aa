"""A ring of direct worker-to-worker connections that sums float32 vectors (all-reduce).

Each member of a ring listens on its worker's host (:func:`open_ports`, on every
worker's event loop before an epoch), connects to the next member and accepts the previous one.
Every connection starts with a handshake that carries the fit's secret: a connection
without it is closed unanswered. :meth:`Ring.allreduce` is the bandwidth-optimal ring
algorithm (a reduce-scatter, then an all-gather): each member sends and receives
``2 (N - 1) / N`` of the vector, whatever the number of members ``N``.

Every wait is bounded by ``timeout``: a member that is lost or stalls makes its
neighbours fail with a :class:`RingError` that names it, within that time, and the
driver restarts the epoch from its own copy of the state.

On a ``tls://`` cluster the connections are wrapped in TLS with the workers' own
certificates (``Security``), so the data is as protected as Dask's own messages.

The same connections serve other patterns than the ring (gossip among neighbours,
:mod:`daskml_scale.training.gossip`): :func:`connect_member` and :func:`accept_member`
open them with the handshake, :func:`port_of` is a member's listening port.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
import struct
import threading
import time
from typing import Any, Callable

import numpy as np

from daskml_scale._utils.lru import LRUCache
from daskml_scale.exceptions import TrainingError

__all__ = [
    "Ring", "RingError", "open_port", "open_ports", "port_of", "close_port", "connect_member", "accept_member", "recv_into", "CHUNK",
]

_HELLO = struct.Struct("<4s32sqq")  # magic, secret, rank, attempt
_MAGIC = b"DKR1"
CHUNK = _CHUNK = struct.Struct("<qq")  # step, number of float32 values (every message's header)
_BUF = 4 << 20  # socket buffers: a chunk up to this size is sent without waiting for the peer


class RingError(TrainingError):
    """A ring member could not be reached or stopped answering.

    Attributes
    ----------
    peer : str
        ``"host:port"`` of the member concerned.
    """

    def __init__(self, message: str, *, peer: str = "") -> None:
        super().__init__(message)
        self.peer = peer

    def __reduce__(self):
        return (type(self), (str(self),), {"peer": self.peer})


# ---------------------------------------------------------------- the listening ports
class _Port:
    def __init__(self, host: str, tls: Any) -> None:
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.create_server((host, 0), family=family, backlog=16)
        self.address = (host, self.sock.getsockname()[1])
        self.tls = tls  # (server ssl context, client ssl context) or None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


_PORTS: LRUCache[tuple[str, int], _Port] = LRUCache(16)
TLS_RINGS = [0]  # rings this process joined over TLS (tests read it)


def _worker_tls(worker: Any = None) -> Any:
    """The worker's TLS contexts (listen, connect) on a ``tls://`` cluster, else None
    (``worker``: this process's worker, by default the one running the current task)."""
    if worker is None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except ValueError:
            return None
    if not worker.address.startswith("tls://"):
        return None
    listen = worker.security.get_listen_args("worker").get("ssl_context")
    connect = worker.security.get_connection_args("worker").get("ssl_context")
    if listen is None or connect is None:
        raise TrainingError("AllReduce on a tls:// cluster needs the workers' TLS certificates (Security)")
    return listen, connect


def open_port(ring_id: str, rank: int, worker: Any = None) -> tuple[str | None, str, int]:
    """Task: listen for this worker's member of ring ``ring_id`` (kept until a
    :class:`Ring` of it is formed, or :func:`close_port`); returns (worker address,
    host, port). Outside a task, pass the ``worker`` (see :func:`open_ports`)."""
    from distributed.comm.addressing import get_address_host

    if worker is None:
        from distributed import get_worker

        worker = get_worker()
    host = get_address_host(worker.address)
    port = _Port(host, _worker_tls(worker))
    old = _PORTS.pop((ring_id, rank))
    if old is not None:
        old.close()
    _PORTS.put((ring_id, rank), port)
    return worker.address, port.address[0], port.address[1]


def open_ports(client: Any, ring_id: str, workers: list[str], timeout: float) -> list[tuple[str | None, str, int]]:
    """Rank ``r``'s port of ring ``ring_id`` opened on ``workers[r]``, for every rank, in one
    ``client.run``: it runs on each worker's event loop, not in its task threads, so a
    worker still busy in a task (a fit's warm-up, tracing the model) opens its port at
    once, and the epoch's tasks queue behind that task instead of starting a round trip
    after it. Bounded by ``timeout`` (a ``ClusterTimeoutError`` naming the workers)."""
    from daskml_scale._utils.waits import within

    ranks = {w: r for r, w in enumerate(workers)}
    opened = within(lambda: client.run(_open_rank_port, ring_id, ranks, workers=list(workers)), timeout,
                    f"Opening the ports of ring {ring_id} on {len(workers)} worker(s)",
                    "A worker that does not answer its scheduler's messages cannot take part.", client)
    return [opened[w] for w in workers]


def _open_rank_port(ring_id: str, ranks: dict[str, int], dask_worker: Any) -> tuple[str | None, str, int]:
    """``client.run`` function of :func:`open_ports`: this worker's rank's port."""
    return open_port(ring_id, ranks[dask_worker.address], worker=dask_worker)


def port_of(ring_id: str, rank: int) -> _Port | None:
    """The port :func:`open_port` opened on this worker for ``rank`` of ``ring_id``."""
    return _PORTS.get((ring_id, rank))


def close_port(ring_id: str) -> int:
    """Run on every worker (``client.run``): close the ports of ring ``ring_id``."""
    closed = 0
    for key in list(_PORTS.keys()):
        if key[0] == ring_id:
            port = _PORTS.pop(key)
            if port is not None:
                port.close()
                closed += 1
    return closed


# ------------------------------------------------------------------------ the ring
def recv_into(conn: socket.socket, view: memoryview, peer: str) -> None:
    got = 0
    while got < len(view):
        try:
            n = conn.recv_into(view[got:], len(view) - got)
        except socket.timeout as exc:
            raise RingError(f"The ring member at {peer} sent nothing for {conn.gettimeout():.0f}s "
                            "(lost or stalled)", peer=peer) from exc
        except OSError as exc:
            raise RingError(f"The connection to the ring member at {peer} broke: {exc}", peer=peer) from exc
        if n == 0:
            raise RingError(f"The ring member at {peer} closed its connection (lost)", peer=peer)
        got += n


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUF)


def connect_member(address: tuple[str, int], name: str, tls: Any, secret: bytes, rank: int, attempt: int,
                   connect_timeout: float, timeout: float) -> Any:
    """A connection to the member listening at ``address`` (``name`` in errors), opened
    with the handshake that carries ``secret``, this member's ``rank`` and the ``attempt``;
    retried until ``connect_timeout``, then :class:`RingError`. Reads on it wait at most
    ``timeout``."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection(address, timeout=min(5.0, connect_timeout))
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RingError(f"Could not connect to the ring member at {name}: {exc}", peer=name) from exc
            time.sleep(0.05)
    _tune(sock)
    if tls is not None:
        sock = tls[1].wrap_socket(sock, server_hostname=None)
    sock.sendall(_HELLO.pack(_MAGIC, secret, rank, attempt))
    sock.settimeout(timeout)
    return sock


def accept_member(port: _Port, secret: bytes, attempt: int, wanted: Callable[[int], bool], deadline: float,
                  timeout: float) -> tuple[Any, int]:
    """The next connection at ``port`` whose handshake carries ``secret``, ``attempt`` and a
    rank that ``wanted`` accepts, with that rank; strangers (no secret, another ring, a
    stale attempt) are closed unanswered. :class:`TimeoutError` at ``deadline``
    (``time.monotonic()``)."""
    while time.monotonic() < deadline:
        port.sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            conn, _ = port.sock.accept()
        except socket.timeout:
            break
        _tune(conn)
        try:
            if port.tls is not None:
                conn = port.tls[0].wrap_socket(conn, server_side=True)
            conn.settimeout(min(5.0, timeout))
            hello = bytearray(_HELLO.size)
            recv_into(conn, memoryview(hello), "a connecting peer")
            magic, got_secret, rank, got_attempt = _HELLO.unpack(hello)
        except (OSError, RingError):
            with contextlib.suppress(OSError):
                conn.close()
            continue
        if magic != _MAGIC or not hmac.compare_digest(got_secret, secret) or not wanted(rank) \
                or got_attempt != attempt:
            with contextlib.suppress(OSError):
                conn.close()  # unanswered: no secret, another ring, or a stale attempt
            continue
        conn.settimeout(timeout)
        return conn, int(rank)
    raise TimeoutError("no member connected")


class Ring:
    """Member ``rank`` of a ring of ``len(addresses)`` members, connected both ways.

    Parameters
    ----------
    ring_id, rank : str, int
        The ring (a fit's epoch attempt) and this member's place in it; the port was
        opened by :func:`open_port` on this worker.
    addresses : list of (host, port)
        Every member's port, by rank.
    secret : bytes
        32 bytes every member knows (made by the driver for the fit).
    timeout : float
        Seconds any wait for a chunk from the previous member may take.
    connect_timeout : float or None
        Seconds to connect to the next member and be connected to by the previous one
        (default ``min(timeout, 10)``): a ring that cannot form fails fast.
    """

    def __init__(self, ring_id: str, rank: int, addresses: list[tuple[str, int]], secret: bytes,
                 timeout: float, attempt: int = 0, connect_timeout: float | None = None) -> None:
        self.rank, self.size = int(rank), len(addresses)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout if connect_timeout is not None else min(timeout, 10.0))
        self._secret = bytes(secret)
        self._attempt = int(attempt)
        self.bytes_sent = 0
        self.prev = self.next = None
        if self.size == 1:
            if (alone := _PORTS.pop((ring_id, self.rank))) is not None:
                alone.close()
            return
        port = port_of(ring_id, self.rank)
        if port is None:
            raise TrainingError(f"Ring {ring_id}: this worker has no port for rank {rank} (was it restarted?)")
        nxt = addresses[(self.rank + 1) % self.size]
        self.next_name = f"{nxt[0]}:{nxt[1]}"
        prv = addresses[(self.rank - 1) % self.size]
        self.prev_name = f"{prv[0]}:{prv[1]}"
        accepted: list[Any] = []
        acceptor = threading.Thread(target=lambda: accepted.append(self._accept(port)), daemon=True)
        acceptor.start()
        self.next = self._connect(tuple(nxt), port.tls)
        acceptor.join(self.connect_timeout + 1)
        if not accepted or isinstance(accepted[0], BaseException):
            self.close()
            err = accepted[0] if accepted else None
            raise RingError(f"The ring member at {self.prev_name} did not connect within {self.connect_timeout:.0f}s",
                            peer=self.prev_name) from err
        self.prev = accepted[0]
        if port.tls is not None:
            TLS_RINGS[0] += 1
        # formed: the listening port has served; closing it here spares the driver a
        # round trip to every worker after each epoch (it still closes ports on failure)
        if _PORTS.pop((ring_id, self.rank)) is not None:
            port.close()

    def _connect(self, address: tuple[str, int], tls: Any) -> Any:
        return connect_member(address, self.next_name, tls, self._secret, self.rank, self._attempt,
                              self.connect_timeout, self.timeout)

    def _accept(self, port: _Port) -> Any:
        """The previous member's connection; strangers (no secret) are closed unanswered."""
        expected = (self.rank - 1) % self.size
        try:
            conn, _ = accept_member(port, self._secret, self._attempt, lambda r: r == expected,
                                    time.monotonic() + self.connect_timeout, self.timeout)
            return conn
        except BaseException as exc:  # handed to the constructor's thread
            return exc

    # ----------------------------------------------------------------- the reduce
    def allreduce(self, vec: np.ndarray) -> np.ndarray:
        """The element-wise sum of every member's ``vec`` (float32, same length), on
        every member. ``vec`` is overwritten with the result."""
        if self.size == 1:
            return vec
        n = self.size
        bounds = np.linspace(0, vec.size, n + 1).astype(np.int64)
        chunk = [vec[bounds[i]: bounds[i + 1]] for i in range(n)]
        scratch = np.empty(int(np.max(np.diff(bounds))), dtype=np.float32)
        head = bytearray(_CHUNK.size)
        for step in range(2 * (n - 1)):
            if step < n - 1:  # reduce-scatter
                send, recv = (self.rank - step) % n, (self.rank - step - 1) % n
            else:  # all-gather
                s = step - (n - 1)
                send, recv = (self.rank - s + 1) % n, (self.rank - s) % n
            sender = self._send(step, chunk[send])
            recv_into(self.prev, memoryview(head), self.prev_name)
            got_step, count = _CHUNK.unpack(head)
            if got_step != step or count != chunk[recv].size:
                raise RingError(f"The ring member at {self.prev_name} is out of step "
                                f"(step {got_step} with {count} values; expected step {step})", peer=self.prev_name)
            if step < n - 1:
                buf = scratch[:count]
                recv_into(self.prev, memoryview(buf).cast("B"), self.prev_name)
                chunk[recv] += buf
            else:
                recv_into(self.prev, memoryview(chunk[recv]).cast("B"), self.prev_name)
            if sender is not None:
                sender.join(self.timeout)
                if sender.is_alive() or getattr(sender, "error", None) is not None:
                    raise RingError(f"Could not send to the ring member at {self.next_name}: "
                                    f"{getattr(sender, 'error', 'timed out')}", peer=self.next_name)
        return vec

    def _send(self, step: int, values: np.ndarray) -> threading.Thread | None:
        """Send a chunk: inline when the socket buffer holds it, else on a thread (so that
        every member can receive while it sends, and no ring waits on itself)."""
        header = _CHUNK.pack(step, values.size)
        data = memoryview(np.ascontiguousarray(values)).cast("B")
        self.bytes_sent += len(header) + len(data)
        if len(data) <= _BUF // 4:
            try:
                self.next.sendall(header + bytes(data))
            except OSError as exc:
                raise RingError(f"Could not send to the ring member at {self.next_name}: {exc}",
                                peer=self.next_name) from exc
            return None

        def run() -> None:
            try:
                self.next.sendall(header)
                self.next.sendall(data)
            except OSError as exc:
                t.error = exc  # type: ignore[attr-defined]

        t = threading.Thread(target=run, daemon=True)
        t.error = None  # type: ignore[attr-defined]
        t.start()
        return t

    def close(self) -> None:
        for sock in (self.prev, self.next):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self.prev = self.next = None
