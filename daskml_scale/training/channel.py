"""A direct TCP channel between the epoch tasks and the parameter server's actor.

A push through a Dask actor call crosses both workers' event loops and the comm
layer's framing: about 0.75 ms for an empty call on a 2-core machine, which is most
of a training step of a small model. The actor therefore also listens on a plain TCP
socket, on the host of its worker, with one thread per connected stream; a push is
one fixed header and the packed float32 gradients, the answer one header and the
packed weights. The Dask actor stays the control plane (load, begin, done, state)
and the fallback: the channel is used only for packed float32 messages on a ``tcp://``
cluster, and ``daskml_scale.training.ps-direct: false`` turns it off.

Every connection starts with a handshake carrying the channel's secret (32 random bytes
made by the server, handed to the epoch tasks with its address through the actor, i.e.
over the cluster's own comms); a connection without it is closed unanswered, so nobody
who merely reaches the port can read weights or push gradients.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import socket
import struct
import threading
import weakref
from typing import Any

import numpy as np

from daskml_scale.exceptions import TrainingError

__all__ = ["ChannelServer", "ChannelClient", "channel_host"]

logger = logging.getLogger(__name__)

# request: magic, stream, chunk, rows, version, task token, number of float32 values that follow
_MAGIC = b"DKP2"
_MAGIC_DELTA = b"DKD2"  # the same request carrying a change of the weights (local steps)
_REQUEST = struct.Struct("<4sqqqqqq")
# answer: status (0 ok, 1 error), version, applied, number of float32 values (or message bytes)
_ANSWER = struct.Struct("<qqqq")
# the first bytes of a connection: magic, the channel's secret
_HELLO_MAGIC = b"DKS1"
_HELLO = struct.Struct("<4s32s")
_HELLO_TIMEOUT = 10.0  # seconds a new connection has to say hello

def channel_host(worker_address: str | None) -> str | None:
    """The host to listen on for a worker at ``worker_address``; None unless plain TCP."""
    if not worker_address:
        return None
    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(worker_address)
    if scheme != "tcp":
        return None  # tls:// (a raw socket would bypass it), inproc://, ucx://: use the actor
    host, _ = parse_host_port(location)
    return host


def _send(conn: socket.socket, header: bytes, values: np.ndarray) -> None:
    """A header and a float32 vector: one write for small messages, no copy for large ones."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.nbytes <= 1 << 20:
        conn.sendall(header + values.tobytes())
    else:
        conn.sendall(header)
        conn.sendall(memoryview(values).cast("B"))


def _recv_into(conn: socket.socket, view: memoryview, *, first: bool = False) -> bool:
    """Fill ``view`` exactly. Only the ``first`` read of a message may meet a clean close
    (False: the peer is done); a close anywhere else is a cut-off message, an error."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:], len(view) - got)
        if n == 0:
            if got == 0 and first:
                return False
            raise ConnectionError("the parameter server channel closed in the middle of a message")
        got += n
    return True


class ChannelServer:
    """Listens on ``host``; each connection is served by its own thread, calling
    ``handler(stream, chunk, gradients, rows, version, token) -> (weights, version, applied)``
    on the object ``owner`` (held weakly: the channel closes when the owner is gone).

    A connection whose header does not start with the channel's magic bytes, or announces
    more than ``max_values`` values, is closed unanswered (a port scanner, another program).
    """

    def __init__(self, host: str, owner: Any, method: str, max_values: int = 1 << 31) -> None:
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
        self._sock = socket.create_server((host, 0), family=family, backlog=64)
        self._sock.settimeout(1.0)  # the accept loop notices a close within a second, whatever the OS
        self.address = (host, self._sock.getsockname()[1])
        self._owner = weakref.ref(owner)
        self._method = method
        self._max_values = int(max_values)
        self.secret = secrets.token_bytes(32)
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="daskml-ps-channel", daemon=True).start()
        weakref.finalize(owner, self.close)

    @property
    def endpoint(self) -> tuple[str, int, bytes]:
        """(host, port, secret): what a :class:`ChannelClient` needs to connect."""
        return (*self.address, self.secret)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for sock in [self._sock, *conns]:  # shutdown wakes the threads blocked in accept / recv
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            conn.settimeout(_HELLO_TIMEOUT)  # the handshake comes at once; then pushes, without a bound
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished peer ends the thread
            with self._lock:
                if self._closed:  # close() already took its snapshot of the connections
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="daskml-ps-stream", daemon=True).start()

    def _hello(self, conn: socket.socket) -> bool:
        hello = bytearray(_HELLO.size)
        try:
            if not _recv_into(conn, memoryview(hello), first=True):
                return False
        except (OSError, TrainingError):
            return False
        magic, secret = _HELLO.unpack(hello)
        if magic != _HELLO_MAGIC or not hmac.compare_digest(secret, self.secret):
            logger.warning("daskml_scale: closed a connection to the parameter server's channel without its secret")
            return False
        conn.settimeout(None)  # a task may compute for long between pushes
        return True

    def _serve(self, conn: socket.socket) -> None:
        head = bytearray(_REQUEST.size)
        try:
            if not self._hello(conn):
                return  # unanswered
            while True:
                if not _recv_into(conn, memoryview(head), first=True):
                    return
                magic, stream, chunk, rows, version, token, n = _REQUEST.unpack(head)
                if magic not in (_MAGIC, _MAGIC_DELTA) or not 0 <= n <= self._max_values:
                    logger.warning("daskml_scale: closed a connection to the parameter server's channel "
                                   "that does not speak its protocol")
                    return
                grads = np.empty(n, dtype=np.float32)
                _recv_into(conn, memoryview(grads).cast("B"))
                owner = self._owner()
                if owner is None:
                    return
                try:
                    extra = {"delta": True} if magic == _MAGIC_DELTA else {}
                    weights, version, applied = getattr(owner, self._method)(
                        stream, chunk, grads, rows, version, token, **extra
                    )
                except Exception as exc:  # reported to the pushing task, which raises it
                    message = f"{type(exc).__name__}: {exc}".encode()
                    conn.sendall(_ANSWER.pack(1, 0, 0, len(message)) + message)
                    continue
                finally:
                    del owner
                _send(conn, _ANSWER.pack(0, int(version), int(bool(applied)), np.size(weights)), weights)
        except OSError:
            return  # the task went away (it is rerun elsewhere) or the channel closed
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()


class ChannelClient:
    """One epoch task's connection to the server's channel.

    ``timeout`` is the server's own barrier timeout: the client waits a little longer, so
    that the server's explanation (which streams the barrier waited for) arrives first.
    """

    def __init__(self, endpoint: tuple[str, int, bytes], timeout: float, connect_timeout: float = 5.0) -> None:
        host, port, secret = endpoint
        self._conn = socket.create_connection((host, port), timeout=min(timeout, connect_timeout))
        self._conn.settimeout(timeout + 30.0)
        self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn.sendall(_HELLO.pack(_HELLO_MAGIC, bytes(secret)))
        self._head = bytearray(_ANSWER.size)

    @classmethod
    def open(cls, address: tuple[str, int, bytes] | None, timeout: float) -> "ChannelClient | None":
        """A connection, or None (pushes then go through actor calls) when there is no
        channel or it cannot be reached, e.g. a firewall that lets only Dask's ports through."""
        if address is None:
            return None
        try:
            return cls(address, timeout)
        except OSError as exc:
            logger.warning(
                "daskml_scale: the parameter server's channel at %s:%s cannot be reached (%s); "
                "this task pushes through actor calls", address[0], address[1], exc,
            )
            return None

    def push(
        self, stream: int, chunk: int, gradients: np.ndarray, rows: int, version: int, token: int = 0,
        delta: bool = False,
    ) -> tuple[np.ndarray, int, bool]:
        conn = self._conn
        try:
            magic = _MAGIC_DELTA if delta else _MAGIC
            header = _REQUEST.pack(magic, int(stream), int(chunk), int(rows), int(version), int(token), np.size(gradients))
            _send(conn, header, gradients)
            _recv_into(conn, memoryview(self._head))  # a close before the answer is an error
            status, version, applied, n = _ANSWER.unpack(self._head)
            if status:
                message = bytearray(n)
                _recv_into(conn, memoryview(message))
                raise TrainingError(f"The parameter server refused a push: {message.decode('utf-8', 'replace')}")
            weights = np.empty(n, dtype=np.float32)
            _recv_into(conn, memoryview(weights).cast("B"))
        except socket.timeout as exc:
            raise TimeoutError(f"The parameter server did not answer a push within {conn.gettimeout():.0f}s") from exc
        return weights, int(version), bool(applied)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()

    def __enter__(self) -> "ChannelClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
