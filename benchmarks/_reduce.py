"""One reduce of a model's worth of float32 values on N worker processes, three ways.

* driver averaging (what ``ModelAveraging`` does each round): the state goes to N
  tasks, N results come back to the driver, which averages them;
* a parameter server (what ``ParameterServer("sync")`` does each step): N workers
  push over the direct channel to a server on its own worker, which averages them
  once all N arrived and answers each with the result;
* AllReduce (``training/ring.py``): the workers reduce among themselves in a ring.

Bytes per worker and round: averaging and the parameter server send 2 x the model
per worker, and their hub (the driver, the server) moves 2 N x the model; the ring
moves 2 (N - 1) / N x the model per worker and has no hub. The workers here need no
TensorFlow: plain ``distributed`` worker processes.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import numpy as np

from _method import Benchmark, Ratio, Variant

REPEATS = 3


def _ring_member(ring_id: str, rank: int, addresses, secret: bytes, size: int, repeats: int) -> float:
    from daskml_scale.training.ring import Ring

    ring = Ring(ring_id, rank, addresses, secret, timeout=120)
    try:
        vec = np.ones(size, np.float32)
        ring.allreduce(vec)  # warm the connections
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            ring.allreduce(vec)
            times.append(time.perf_counter() - t)
        return float(np.median(times))
    finally:
        ring.close()


class _SyncOwner:
    """A parameter server's barrier: the mean of N pushes goes back to each of them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cond = threading.Condition()
        self.pending: list[np.ndarray] = []
        self.result: np.ndarray | None = None
        self.round = 0

    def handle(self, stream, chunk, values, rows, version, token=0):
        with self.cond:
            my_round = self.round
            self.pending.append(values)
            if len(self.pending) == self.n:
                self.result = np.mean(self.pending, axis=0, dtype=np.float32)
                self.pending = []
                self.round += 1
                self.cond.notify_all()
            else:
                self.cond.wait_for(lambda: self.round != my_round, timeout=120)
            return self.result, self.round, True


def _serve(n: int, ready: Any, stop: Any) -> int:
    """A task: a parameter server on this worker until ``stop`` is set (after the pushers
    got their last answers)."""
    from distributed import get_worker
    from distributed.comm.addressing import get_address_host

    from daskml_scale.training.channel import ChannelServer

    owner = _SyncOwner(n)
    server = ChannelServer(get_address_host(get_worker().address), owner, "handle")
    ready.set(list(server.endpoint))  # host, port and the channel's secret
    stop.wait(timeout=600)
    server.close()
    return owner.round


def _push(address, stream: int, size: int, repeats: int) -> float:
    from daskml_scale.training.channel import ChannelClient

    vec = np.ones(size, np.float32)
    with ChannelClient(tuple(address), timeout=120) as link:
        link.push(stream, 0, vec, 1, 0)  # warm
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            link.push(stream, i + 1, vec, 1, 0)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def _train_like(state: np.ndarray) -> np.ndarray:
    return state + np.float32(1e-3)  # a "round": the state in, new weights out


def reduce_scaling(bench: Benchmark, *, quick: bool) -> None:
    from distributed import Client, Event, LocalCluster, Variable

    from daskml_scale.training.ring import close_port, open_port

    sizes = [10_000, 1_000_000] if quick else [10_000, 100_000, 1_000_000, 10_000_000]
    counts = [2, 4] if quick else [2, 4, 8]
    for n in counts:
        # n workers for the reduce, one more for the parameter server
        with LocalCluster(n_workers=n + 1, threads_per_worker=1, dashboard_address=None, processes=True) as cluster, \
                Client(cluster) as client:
            workers = sorted(client.nthreads())
            members, hub = workers[:n], workers[n]
            for size in sizes:
                mb = size * 4 / 1e6

                def ring() -> dict:
                    ring_id = f"bench-{secrets.token_hex(4)}"
                    secret = secrets.token_bytes(32)
                    opened = client.gather([client.submit(open_port, ring_id, r, workers=[w], pure=False)
                                            for r, w in enumerate(members)])
                    addresses = [(h, p) for _, h, p in opened]
                    futs = [client.submit(_ring_member, ring_id, r, addresses, secret, size, REPEATS, workers=[w],
                                          pure=False) for r, w in enumerate(members)]
                    secs = max(client.gather(futs, errors="raise"))
                    client.run(close_port, ring_id, workers=members)
                    return {"seconds": secs, "mb_per_worker": 2 * (n - 1) / n * mb}

                def ps() -> dict:
                    tag = secrets.token_hex(4)
                    ready, stop = Variable(f"ps-{tag}", client=client), Event(f"stop-{tag}", client=client)
                    server = client.submit(_serve, n, ready, stop, workers=[hub], pure=False)
                    address = ready.get(timeout=60)
                    futs = [client.submit(_push, address, r, size, REPEATS, workers=[w], pure=False)
                            for r, w in enumerate(members)]
                    try:
                        secs = max(client.gather(futs))
                    finally:
                        stop.set()
                    server.result(timeout=120)
                    return {"seconds": secs, "mb_per_worker": 2 * mb, "mb_at_hub": 2 * n * mb}

                def averaging() -> dict:
                    state = np.ones(size, np.float32)
                    times = []
                    for _ in range(REPEATS):
                        t = time.perf_counter()
                        shipped = client.scatter(state, direct=True) if state.nbytes > (1 << 20) else state
                        futs = [client.submit(_train_like, shipped, workers=[w], pure=False) for w in members]
                        state = np.mean(client.gather(futs), axis=0, dtype=np.float32)
                        times.append(time.perf_counter() - t)
                    return {"seconds": float(np.median(times)), "mb_per_worker": 2 * mb, "mb_at_hub": 2 * n * mb}

                bench.compare(
                    f"reduce-n{n}-p{size}", f"one reduce of {size:,} float32 parameters on {n} workers",
                    [Variant("averaging", averaging, "driver averaging (a ModelAveraging round)", {"workers": n}),
                     Variant("ps", ps, "parameter server, direct channel, sync barrier", {"workers": n}),
                     Variant("allreduce", ring, "AllReduce ring among the workers", {"workers": n})],
                    show=["mb_per_worker"],
                    ratios=[Ratio("allreduce", "averaging", "AllReduce vs driver averaging"),
                            Ratio("allreduce", "ps", "AllReduce vs the parameter server")],
                )
