"""Online serving under load: micro-batching on vs off, 1/16/64 concurrent clients.

A real server process (``python -m daskml_scale.serving``) on 127.0.0.1 and a load
generator in ANOTHER process (this file with ``--load``), so that the client's
work is not counted in the server's event loop; on a 2-core machine the two still
share the cores, which is said next to the figures. The generator is bounded: a
fixed number of requests per run, a time limit, loopback only.

    .venv/bin/python benchmarks/bench_serving.py            # the whole matrix
    .venv/bin/python benchmarks/bench_serving.py --quick    # fewer requests
    .venv/bin/python benchmarks/bench_serving.py --frameworks   # Starlette vs FastAPI, no model

Prints requests/s, rows/s, p50/p99 latency per (mode, clients, rows per request),
the mean batch size from the server's /metrics, and the ratio of micro-batched to
per-request rows/s measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


# ----------------------------------------------------------------------------- load
async def _load(url: str, body: bytes, clients: int, requests: int, time_limit: float) -> dict:
    """``requests`` POSTs of ``body`` from ``clients`` concurrent connections."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.monotonic() + time_limit
    headers = {"content-type": "application/json"}
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        aiohttp = None

    if aiohttp is not None:
        conn = aiohttp.TCPConnector(limit=clients, force_close=False)
        session = aiohttp.ClientSession(connector=conn)

        async def one() -> int:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                return r.status
    else:
        import httpx

        session = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients))

        async def one() -> int:
            r = await session.post(url, content=body, headers=headers)
            return r.status_code

    async def worker() -> None:
        nonlocal issued, errors
        while issued < requests and time.monotonic() < deadline:
            issued += 1
            t0 = time.perf_counter()
            try:
                status = await one()
            except Exception:
                status = 0
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        wall = time.perf_counter() - t0
    finally:
        await (session.close() if aiohttp is not None else session.aclose())
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n, "errors": errors, "wall_s": wall, "req_s": n / wall,
        "p50_ms": latencies[n // 2] * 1e3 if n else float("nan"),
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3 if n else float("nan"),
    }


def load_main(args: argparse.Namespace) -> None:
    body = Path(args.body).read_bytes()
    # warm-up: connections, server caches
    asyncio.run(_load(args.url, body, args.clients, min(args.requests, 4 * args.clients), 30))
    out = asyncio.run(_load(args.url, body, args.clients, args.requests, args.time_limit))
    print(json.dumps(out))


# ------------------------------------------------------------------------ frameworks
def frameworks_main() -> None:
    """Per-request cost of the web framework alone: in-process ASGI calls, no model.

    Starlette vs FastAPI (validating a pydantic list of records, and with a raw
    Request): the measurement behind choosing Starlette. Needs ``fastapi``.
    """
    from typing import Optional

    import orjson
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from daskml_scale.datasets import diamonds

    async def st_echo(request: Request) -> Response:
        data = orjson.loads(await request.body())
        return Response(orjson.dumps([{"prediction": 1.0} for _ in data]), media_type="application/json")

    apps = {"starlette": Starlette(routes=[Route("/predict", st_echo, methods=["POST"])])}
    try:
        from fastapi import FastAPI
        from pydantic import BaseModel
    except ImportError:
        print("fastapi is not installed: measuring starlette only")
    else:
        class Rec(BaseModel):
            carat: float
            cut: str
            color: str
            clarity: str
            depth: float
            table: float
            x: float
            y: float
            z: float
            id: Optional[int] = None  # noqa: UP007  (pydantic evaluates it)

        class Out(BaseModel):
            prediction: float

        async def fa_echo(rows):
            return [Out(prediction=1.0) for _ in rows]

        # real annotations (this module postpones them): FastAPI reads them to validate
        fa_echo.__annotations__ = {"rows": list[Rec], "return": list[Out]}
        fa = FastAPI()
        fa.add_api_route("/predict", fa_echo, methods=["POST"])

        async def fa_raw_echo(request):
            return await st_echo(request)

        fa_raw_echo.__annotations__ = {"request": Request}
        fa_raw = FastAPI()
        fa_raw.add_api_route("/predict", fa_raw_echo, methods=["POST"])
        apps.update({"fastapi + pydantic": fa, "fastapi, raw Request": fa_raw})

    async def call(app, body: bytes) -> None:
        msgs = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return msgs.pop() if msgs else {"type": "http.disconnect"}

        out = []

        async def send(m):
            out.append(m)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
            "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
        await app(scope, receive, send)
        assert out[0]["status"] == 200, out

    recs = diamonds().drop(columns=["price"]).iloc[:100].to_dict("records")

    async def run() -> None:
        for n in (1, 100):
            body = json.dumps(recs[:n]).encode()
            for name, app in apps.items():
                for _ in range(200):
                    await call(app, body)
                k = 3000 if n == 1 else 1000
                t0 = time.perf_counter()
                for _ in range(k):
                    await call(app, body)
                print(f"{n:4d} rows/request  {name:22s} {(time.perf_counter() - t0) / k * 1e6:8.1f} us/request")

    asyncio.run(run())


# ---------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(directory: str) -> str:
    """A small MLP on the diamonds table, trained a few steps, saved as a bundle."""
    import keras

    import daskml_scale
    from daskml_scale.bundle import save_bundle
    from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform

    df = diamonds().iloc[:5000]
    pre = daskml_scale.Preprocessor(
        target="log_price", numeric=[*DIAMONDS_NUMERIC, "volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=diamonds_transform,
    ).fit(df)
    X, y = pre.transform(df)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((X.shape[1],)), keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1),
    ])
    model.compile("adam", "mse")
    model.fit(X, y, epochs=1, batch_size=256, verbose=0)
    return save_bundle(model, pre, os.path.join(directory, "diamonds.bundle"))


def start_server(bundle: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "daskml_scale.serving", bundle, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server did not become ready in 120 s")


def batch_stats(port: int) -> tuple[float, float]:
    """(model calls, rows predicted) from the server's /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    calls = float(re.search(r"^daskml_scale_batch_rows_count (\S+)$", text, re.M).group(1))
    rows = float(re.search(r"^daskml_scale_batch_rows_sum (\S+)$", text, re.M).group(1))
    return calls, rows


def run_matrix(args: argparse.Namespace) -> None:
    import pandas as pd

    from daskml_scale.datasets import diamonds

    tmp = tempfile.mkdtemp(prefix="bench-serving-")
    bundle = args.bundle or make_bundle(tmp)
    rows_df = diamonds().drop(columns=["price"]).iloc[:100]
    bodies = {}
    for r in args.rows:
        p = Path(tmp) / f"body-{r}.json"
        p.write_bytes(json.dumps(rows_df.iloc[:r].to_dict("records")).encode())
        bodies[r] = str(p)
    modes = {"batched": [], "per-request": ["--no-micro-batching"]}
    results = []
    for mode, flags in modes.items():
        port = free_port()
        server = start_server(bundle, port, [*flags, *args.server_args])
        try:
            for clients in args.clients:
                for r in args.rows:
                    n = args.requests if r == 1 else max(args.requests // 4, 50)
                    calls0, rows0 = batch_stats(port)
                    cmd = [
                        sys.executable, str(HERE), "--load", "--url", f"http://127.0.0.1:{port}/predict",
                        "--body", bodies[r], "--clients", str(clients), "--requests", str(n),
                    ]
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                    if out.returncode != 0:
                        raise RuntimeError(out.stderr)
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    calls1, rows1 = batch_stats(port)
                    res.update(mode=mode, clients=clients, rows=r, rows_s=res["req_s"] * r,
                               mean_batch_rows=(rows1 - rows0) / max(calls1 - calls0, 1))
                    results.append(res)
                    print(
                        f"{mode:12s} clients={clients:3d} rows/req={r:4d}  {res['req_s']:8.0f} req/s "
                        f"{res['rows_s']:9.0f} rows/s  p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  "
                        f"mean batch {res['mean_batch_rows']:6.1f} rows  errors {res['errors']}",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait(timeout=30)
    df = pd.DataFrame(results)
    print("\nmicro-batched rows/s / per-request rows/s (same run):")
    piv = df.pivot_table(index=["clients", "rows"], columns="mode", values="rows_s")
    piv["ratio"] = piv["batched"] / piv["per-request"]
    print(piv.round(1).to_string())
    if args.json:
        Path(args.json).write_text(df.to_json(orient="records", indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url")
    p.add_argument("--body")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 100])
    p.add_argument("--requests", type=int, default=4000, help="requests per single-row run (100-row runs: 1/4)")
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--bundle", default=None, help="serve this bundle instead of training a small one")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--frameworks", action="store_true", help="only compare Starlette and FastAPI overhead")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra server flags, last")
    args = p.parse_args()
    if args.load:
        args.clients = args.clients[0]
        load_main(args)
        return
    if args.frameworks:
        frameworks_main()
        return
    if args.quick:
        args.requests = 1000
    run_matrix(args)


if __name__ == "__main__":
    main()
