"""A gossip member's network: messages out on threads, a mailbox in, bounded waits.

A :class:`Node` is one worker's member of one gossip epoch. It listens on the port that
:func:`~daskml_scale.training.ring.open_ports` opened for it and accepts any other member
of the epoch (the same handshake, secret and TLS as the ring's connections). Sending
never blocks training: each neighbour has a thread with a slot for the newest message
(an older one not yet sent is replaced). Receiving fills a mailbox with the newest
message of each sender; :meth:`Node.take` waits for an expected sender at most the
budget it is given, and a sender that said it finished, or whose connection broke, is
not waited for.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
import time
from typing import Any

import numpy as np

from daskml_scale.exceptions import TrainingError
from daskml_scale.training import ring
from daskml_scale.training.ring import CHUNK, RingError, accept_member, connect_member, port_of, recv_into

__all__ = ["Node"]

_BYE = -1  # a message's step: the sender finished its epoch
_PACE = 5  # a member's pace: the median of its last gaps between messages
#: a neighbour is a straggler when its pace is 1.5x this member's own AND this much slower:
#: on rounds of a few milliseconds, the jitter of a shared core alone makes paces 1.5x apart,
#: and waiting costs less than the skipped exchange does to the consensus
_MIN_LAG_S = 0.004


class _Sender:
    """The thread that connects to one neighbour and sends it the newest message."""

    def __init__(self, node: "Node", peer: int) -> None:
        self.node, self.peer = node, peer
        host, port = node.addresses[peer]
        self.name = f"{host}:{port}"
        self.cond = threading.Condition()
        self.pending: tuple[int, np.ndarray] | None = None
        self.closing = False
        self.dead = False
        self.thread = threading.Thread(target=self._run, name=f"daskml-gossip-send-{peer}", daemon=True)
        self.thread.start()

    def offer(self, step: int, vec: np.ndarray) -> None:
        with self.cond:
            if self.pending is not None and self.pending[0] == _BYE:
                return
            self.pending = (step, vec)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()

    def _run(self) -> None:
        node = self.node
        try:
            sock = connect_member(tuple(node.addresses[self.peer]), self.name, node.tls, node.secret, node.rank, 0,
                                  node.connect_timeout, node.timeout)
        except RingError:
            self.dead = True  # unreachable: our messages to it are dropped; it is not waited for
            return
        try:
            while True:
                with self.cond:
                    while self.pending is None and not self.closing:
                        self.cond.wait(1.0)  # wait-bounded: rechecks closing every second
                    if self.pending is None:
                        return
                    step, vec = self.pending
                    self.pending = None
                data = memoryview(np.ascontiguousarray(vec, dtype=np.float32)).cast("B")
                sock.sendall(CHUNK.pack(step, vec.size))
                sock.sendall(data)
                node.bytes_sent += CHUNK.size + len(data)
                if step == _BYE:
                    return
        except OSError:
            self.dead = True
        finally:
            with contextlib.suppress(OSError):
                sock.close()


class Node:
    """Member ``rank`` of the gossip epoch ``gid`` of ``len(addresses)`` members.

    Attributes
    ----------
    mixed, skipped : int
        Messages taken from the mailbox; expected messages that did not come in time.
    max_wait_s : float
        The longest :meth:`take` (the bound it was given, plus scheduling noise).
    """

    def __init__(self, gid: str, rank: int, addresses: list[tuple[str, int]], secret: bytes, timeout: float) -> None:
        self.rank, self.n = int(rank), len(addresses)
        self.addresses = addresses
        self.secret = bytes(secret)
        self.timeout = float(timeout)
        self.connect_timeout = min(self.timeout, 10.0)
        self.mixed = self.skipped = self.bytes_sent = 0
        self.max_wait_s = 0.0
        self._cond = threading.Condition()
        self._box: dict[int, tuple[int, np.ndarray]] = {}  # the newest unread message (round, state) per sender
        self._gone: set[int] = set()  # finished or lost: not waited for
        self._last: dict[int, float] = {}  # when each sender's last message came
        self._gaps: dict[int, deque[float]] = {}  # the last gaps between its messages
        self._own_last: float | None = None
        self._own_gaps: deque[float] = deque(maxlen=_PACE)  # and between this member's
        self._senders: dict[int, _Sender] = {}
        self._conns: list[Any] = []
        self._closed = False
        self.port = port_of(gid, self.rank) if self.n > 1 else None
        self.tls = None
        if self.n == 1:
            return
        if self.port is None:
            raise TrainingError(f"Gossip {gid}: this worker has no port for rank {rank} (was it restarted?)")
        self.tls = self.port.tls
        if self.tls is not None:
            ring.TLS_RINGS[0] += 1
        threading.Thread(target=self._listen, name="daskml-gossip-listen", daemon=True).start()

    # ------------------------------------------------------------------ receiving
    def _listen(self) -> None:
        others = lambda r: 0 <= r < self.n and r != self.rank  # noqa: E731
        while not self._closed:
            try:
                conn, peer = accept_member(self.port, self.secret, 0, others, time.monotonic() + 0.5, self.timeout)
            except TimeoutError:
                continue
            except OSError:  # the port was closed: the epoch is over
                return
            self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn, peer), name=f"daskml-gossip-recv-{peer}",
                             daemon=True).start()

    def _read(self, conn: Any, peer: int) -> None:
        host, port = self.addresses[peer]
        name = f"{host}:{port}"
        head = bytearray(CHUNK.size)
        try:
            while not self._closed:
                recv_into(conn, memoryview(head), name)
                step, count = CHUNK.unpack(head)
                if step == _BYE:
                    break
                vec = np.empty(count, dtype=np.float32)
                recv_into(conn, memoryview(vec).cast("B"), name)
                with self._cond:
                    self._box[peer] = (step, vec)
                    now = time.monotonic()
                    if peer in self._last:
                        self._gaps.setdefault(peer, deque(maxlen=_PACE)).append(now - self._last[peer])
                    self._last[peer] = now
                    self._cond.notify_all()
        except RingError:
            pass  # broke, closed, or silent for `timeout`: lost
        with self._cond:
            self._gone.add(peer)
            self._cond.notify_all()

    def _hopeless(self, q: int) -> bool:
        """Whether ``q`` is not worth waiting for: its messages come at a slower pace than
        this member's own (a straggler), or the next one is long overdue (a silent one)."""
        if not self._gaps.get(q) or not self._own_gaps:
            return False
        period, own = float(np.median(self._gaps[q])), float(np.median(self._own_gaps))
        if period > 1.5 * own and period - own > _MIN_LAG_S:
            return True
        return time.monotonic() > self._last[q] + 3 * max(period, own)

    def take(self, expected: list[int], round_: int, budget: float) -> list[np.ndarray]:
        """The messages of ``expected`` senders, and any other unread ones.

        An expected sender's message of round ``round_`` (or later) is waited for until
        ``budget`` seconds have passed in all; then an older unread one of it is taken
        instead, and none at all is a skip. A sender that is slower than this member, or
        silent, is not waited for."""
        t0 = time.monotonic()
        deadline = t0 + max(0.0, budget)
        got: list[np.ndarray] = []
        with self._cond:
            for q in expected:
                while (q not in self._box or self._box[q][0] < round_) and q not in self._gone \
                        and not self._hopeless(q):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)  # wait-bounded: the budget's time left
                msg = self._box.pop(q, None)
                if msg is None:
                    self.skipped += 1
                else:
                    got.append(msg[1])
            for q in list(self._box):  # came late, or from a random round's other sender
                got.append(self._box.pop(q)[1])
        self.mixed += len(got)
        self.max_wait_s = max(self.max_wait_s, time.monotonic() - t0)
        return got

    # -------------------------------------------------------------------- sending
    def _sender(self, peer: int) -> _Sender:
        s = self._senders.get(peer)
        if s is None:
            s = self._senders[peer] = _Sender(self, peer)
        return s

    def send(self, peers: list[int], step: int, vec: np.ndarray) -> None:
        """Hand ``vec`` (copied) to the senders of ``peers``; returns at once."""
        now = time.monotonic()
        if self._own_last is not None:
            self._own_gaps.append(now - self._own_last)
        self._own_last = now
        if not peers:
            return
        out = vec.copy()
        for q in peers:
            if q not in self._gone:
                self._sender(q).offer(step, out)

    def finish(self, everyone: bool) -> None:
        """Tell the members that may wait for this one (those it sent to; ``everyone``:
        all) that it finished its epoch."""
        targets = range(self.n) if everyone else list(self._senders)
        for q in targets:
            if q != self.rank:
                self._sender(q).offer(_BYE, np.zeros(0, np.float32))

    def close(self, flush_s: float = 2.0) -> None:
        """Stop: the last messages get ``flush_s`` seconds in all to go out."""
        self._closed = True
        for s in self._senders.values():
            s.close()
        deadline = time.monotonic() + flush_s
        for s in self._senders.values():
            s.thread.join(max(0.0, deadline - time.monotonic()))
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()
