"""Online serving under load: micro-batching on vs off (per-request prediction, the
baseline), 1/16/64 concurrent clients, 1- and 100-row requests; in the same run, the two
figures of the serving targets (a single client's latency, p50 and p99 of sequential
keep-alive requests; requests/s and p99 at 256 connections), single-row requests of every
protocol (v2 JSON, v2 with the binary body tritonclient makes, TF Serving, MLflow) against
``/predict`` on the same server, and an overload run (many connections against a short
queue: accepted and refused requests/s, p99 of the accepted).

Real server processes (``python -m daskml_scale.serving``) on 127.0.0.1: one micro-batched
and one with ``--no-micro-batching`` serving a bundle with a pandas transform (the
examples' ``diamonds_transform``), and for the two target figures a third serving a bundle
without a transform (the NumPy path, :mod:`daskml_scale.serving.fastpath`); a load
generator in ANOTHER process (this file with ``--load``), so that the client's work is not
counted in the server's event loop. The generator is a minimal asyncio HTTP/1.1 client
(``--client raw``, the default: a few microseconds per request) or aiohttp
(``--client aiohttp``). On a 2-core machine the servers and the generator still share the
cores, which is said next to the figures. The generator is bounded: a fixed number of
requests per run, a time limit, loopback only.

Every cell is one comparison of the modes with the method of ``benchmarks/_method.py``:
one warm-up each, then interleaved rounds, medians with min and max, ratios against the
per-request baseline measured in the same run. Only successful (HTTP 200) requests count
toward requests/s and latency; a run with any failed request is reported as failed, not timed.
Results: ``benchmarks/results/serving.json``.

    .venv/bin/python benchmarks/bench_serving.py            # the whole matrix
    .venv/bin/python benchmarks/bench_serving.py --quick    # fewer requests: a check, not a figure
    .venv/bin/python benchmarks/bench_serving.py --frameworks   # Starlette vs FastAPI, no model

Prints requests/s, rows/s, p50/p99 latency per (mode, clients, rows per request),
the mean batch size from the server's /metrics, and the ratio of micro-batched to
per-request figures measured in the same run.
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
sys.path.insert(0, str(HERE.parent))


# ----------------------------------------------------------------------------- load
def _summary(latencies: list[float], issued: int, requests: int, errors: int, refused: int, wall: float,
             first_error: list[str]) -> dict:
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n, "issued": issued, "errors": errors, "error": first_error[0] if first_error else None,
        "truncated": issued < requests, "wall_s": wall, "req_s": n / wall, "refused": refused,
        "refused_s": refused / wall,
        "p50_ms": latencies[n // 2] * 1e3 if n else float("nan"),
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3 if n else float("nan"),
    }


async def _load_raw(url: str, body: bytes, clients: int, requests: int, time_limit: float,
                    extra_headers: dict[str, str] | None = None, overload: bool = False) -> dict:
    """As :func:`_load`, with a minimal HTTP/1.1 client: one keep-alive connection per
    client, the request's bytes made once, the answer read by its ``Content-Length``.

    A few microseconds of the load generator's CPU per request instead of aiohttp's ~100:
    on a machine where the generator and the server share the cores, the server gets
    them. (The server always answers with a ``Content-Length``; anything else counts as
    an error.)
    """
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")
    headers = {"content-type": "application/json", **(extra_headers or {})}
    head = f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = head.encode("latin-1") + b"\r\n" + body
    latencies: list[float] = []
    first_error: list[str] = []
    counts = {"issued": 0, "errors": 0, "refused": 0}
    deadline = time.monotonic() + time_limit

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(request)
        answer = await reader.readuntil(b"\r\n\r\n")
        status = int(answer[9:12])
        at = answer.lower().find(b"\r\ncontent-length:")
        if at < 0:
            raise RuntimeError(f"an answer without a Content-Length: {answer[:200]!r}")
        end = answer.index(b"\r\n", at + 2)
        await reader.readexactly(int(answer[at + 17 : end]))
        return status

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while counts["issued"] < requests and time.monotonic() < deadline:
                counts["issued"] += 1
                t0 = time.perf_counter()
                try:
                    status = await one(reader, writer)
                except Exception as exc:  # noqa: BLE001  (a failed request is counted, not raised)
                    status, detail = 0, f"{type(exc).__name__}: {exc}"
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                else:
                    detail = f"HTTP {status}"
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                elif overload and status == 503:
                    counts["refused"] += 1
                else:
                    counts["errors"] += 1
                    if not first_error:
                        first_error.append(detail)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    wall = time.perf_counter() - t0
    return _summary(latencies, counts["issued"], requests, counts["errors"], counts["refused"], wall, first_error)


async def _load(url: str, body: bytes, clients: int, requests: int, time_limit: float,
                extra_headers: dict[str, str] | None = None, overload: bool = False) -> dict:
    """``requests`` POSTs of ``body`` from ``clients`` concurrent connections (aiohttp, else httpx).

    ``overload``: a 503 is a refusal (counted in ``refused``), not an error.
    """
    latencies: list[float] = []
    errors = 0
    refused = 0
    issued = 0
    deadline = time.monotonic() + time_limit
    headers = {"content-type": "application/json", **(extra_headers or {})}
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

    first_error: list[str] = []

    async def worker() -> None:
        nonlocal issued, errors, refused
        while issued < requests and time.monotonic() < deadline:
            issued += 1
            t0 = time.perf_counter()
            try:
                status = await one()
            except Exception as exc:  # noqa: BLE001  (a failed request is counted, not raised)
                status, detail = 0, f"{type(exc).__name__}: {exc}"
            else:
                detail = f"HTTP {status}"
            if status == 200:  # only answered requests count toward requests/s and latency
                latencies.append(time.perf_counter() - t0)
            elif overload and status == 503:
                refused += 1
            else:
                errors += 1
                if not first_error:
                    first_error.append(detail)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        wall = time.perf_counter() - t0
    finally:
        await (session.close() if aiohttp is not None else session.aclose())
    return _summary(latencies, issued, requests, errors, refused, wall, first_error)


GENERATORS = {"raw": _load_raw, "aiohttp": _load}


def load_main(args: argparse.Namespace) -> None:
    body = Path(args.body).read_bytes()
    headers = json.loads(args.headers) if args.headers else None
    load = GENERATORS[args.client]
    run = _event_loop_runner()
    # warm-up: connections, server caches; its failed requests count too
    warm = run(load(args.url, body, args.clients, min(args.requests, 4 * args.clients), 30, headers, args.overload))
    out = run(load(args.url, body, args.clients, args.requests, args.time_limit, headers, args.overload))
    out["warmup_errors"] = warm["errors"]
    out["errors"] += warm["errors"]
    out["error"] = out["error"] or warm["error"]
    print(json.dumps(out))


def _event_loop_runner():
    """``uvloop.run`` where uvloop is installed (as the server runs), else ``asyncio.run``."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the environment
        return asyncio.run
    return uvloop.run


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


def make_bundle(directory: str, transform: bool = True) -> str:
    """A small MLP on the diamonds table, trained a few steps, saved as a bundle: with the
    pandas transform of the examples (``diamonds_transform``, a derived column and a log
    target), or without one (``plain.bundle``: the raw columns, served by the NumPy path)."""
    import keras

    import daskml_scale
    from daskml_scale.bundle import save_bundle
    from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform

    df = diamonds().iloc[:5000]
    if transform:
        pre = daskml_scale.Preprocessor(
            target="log_price", numeric=[*DIAMONDS_NUMERIC, "volume"], categorical=DIAMONDS_CATEGORICAL,
            transform=diamonds_transform,
        ).fit(df)
    else:
        pre = daskml_scale.Preprocessor(target="price", numeric=DIAMONDS_NUMERIC, categorical=DIAMONDS_CATEGORICAL).fit(df)
    X, y = pre.transform(df)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((X.shape[1],)), keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1),
    ])
    model.compile("adam", "mse")
    model.fit(X, y, epochs=1, batch_size=256, verbose=0)
    return save_bundle(model, pre, os.path.join(directory, "diamonds.bundle" if transform else "plain.bundle"))


def start_server(bundle: str, port: int, extra: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "daskml_scale.serving", bundle, "--port", str(port), *extra]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
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


def _load_run(port: int, body: str, clients: int, rows: int, requests: int, time_limit: float,
              path: str = "/predict", headers: dict[str, str] | None = None, overload: bool = False,
              client: str = "raw", pid: int | None = None):
    """A variant: one load-generator run (``client``: a key of :data:`GENERATORS`) against the
    server on ``port``; with the server's ``pid``, also its CPU time per answered request
    (``server_cpu_us``: what a requests/s figure on a shared machine comes down to)."""

    def cpu() -> float:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system

    def run() -> dict:
        calls0, rows0 = batch_stats(port)
        cpu0 = cpu() if pid else 0.0
        cmd = [
            sys.executable, str(HERE), "--load", "--url", f"http://127.0.0.1:{port}{path}",
            "--body", body, "--clients", str(clients), "--requests", str(requests), "--time-limit", str(time_limit),
            "--client", client,
            *(["--headers", json.dumps(headers)] if headers else []), *(["--overload"] if overload else []),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=time_limit + 120)
        if out.returncode != 0:
            raise RuntimeError(f"the load generator exited with {out.returncode}: {out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        calls1, rows1 = batch_stats(port)
        if pid:
            res["server_cpu_us"] = (cpu() - cpu0) / max(res["requests"], 1) * 1e6
        res["load_wall_s"] = res.pop("wall_s")
        res.update(rows_s=res["req_s"] * rows, mean_batch_rows=(rows1 - rows0) / max(calls1 - calls0, 1))
        return res

    return run


def protocol_bodies(tmp: str, rows_df, bundle_url: str) -> dict[str, tuple[str, str, dict[str, str] | None]]:
    """One single-row request per dialect: name -> (path, body file, extra headers).

    The v2 binary body is made by ``tritonclient`` itself (``generate_request_body``), as
    ``InferenceServerClient.infer`` sends it.
    """
    import numpy as np

    from daskml_scale.bundle import load_bundle

    one = rows_df.iloc[:1]
    spec_cols = [c for c in load_bundle(bundle_url).input_schema if c in one.columns]
    one = one[spec_cols]
    name = Path(bundle_url).name.removesuffix(".bundle")
    out: dict[str, tuple[str, str, dict[str, str] | None]] = {}

    def write(key: str, data: bytes) -> str:
        p = Path(tmp) / f"proto-{key}.body"
        p.write_bytes(data)
        return str(p)

    out["predict"] = ("/predict", write("predict", json.dumps(one.to_dict("records")).encode()), None)
    cols = []
    for c in one.columns:
        v = one[c].tolist()
        dt = "FP64" if isinstance(v[0], float) else ("INT64" if isinstance(v[0], int) else "BYTES")
        cols.append({"name": c, "datatype": dt, "shape": [1, 1], "data": [str(x) for x in v] if dt == "BYTES" else v})
    out["v2_json"] = (f"/v2/models/{name}/infer",
                      write("v2_json", json.dumps({"parameters": {"content_type": "pd"}, "inputs": cols}).encode()), None)
    try:
        import tritonclient.http as triton
    except ImportError:
        print("tritonclient is not installed: no v2 binary requests")
    else:
        inputs = []
        for c in one.columns:
            v = one[c].to_numpy()
            if v.dtype.kind == "f":
                t, arr = triton.InferInput(c, [1, 1], "FP32"), v.astype(np.float32).reshape(1, 1)
            elif v.dtype.kind in "iu":
                t, arr = triton.InferInput(c, [1, 1], "INT64"), v.astype(np.int64).reshape(1, 1)
            else:
                t, arr = triton.InferInput(c, [1, 1], "BYTES"), np.array([str(x).encode() for x in v], dtype=object).reshape(1, 1)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        body, json_size = triton.InferenceServerClient.generate_request_body(inputs)
        headers = {"content-type": "application/octet-stream"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        out["v2_tritonclient"] = (f"/v2/models/{name}/infer", write("v2_triton", body), headers)
    out["tfserving"] = (f"/v1/models/{name}:predict", write("tf", json.dumps({"instances": one.to_dict("records")}).encode()), None)
    split = {"columns": list(one.columns), "data": one.values.tolist()}
    out["mlflow"] = ("/invocations", write("mlflow", json.dumps({"dataframe_split": split}).encode()), None)
    return out


def run_protocols(bench, args: argparse.Namespace, port: int, bodies: dict, server_flags: list[str],
                  pid: int | None = None) -> None:
    """Single-row requests of every dialect against the same (micro-batched) server, in
    ``--protocol-rounds`` interleaved rounds (requests/s on 2 shared cores swings by 2x
    between runs; the server's CPU per request, shown beside, swings far less)."""
    from _method import Ratio, Variant

    labels = {"predict": "POST /predict, a JSON list of records", "v2_json": "v2 infer, JSON, content_type pd",
              "v2_tritonclient": "v2 infer, the binary body tritonclient sends",
              "tfserving": "TF Serving :predict, instances as objects", "mlflow": "MLflow /invocations, dataframe_split"}
    for clients in sorted({min(args.clients), max(args.clients)}):
        n = args.requests
        variants = [
            Variant(key, _load_run(port, body, clients, 1, n, args.time_limit, path, headers, client=args.client,
                                   pid=pid),
                    labels[key],
                    {"server": f"python -m daskml_scale.serving BUNDLE {' '.join(server_flags)}".strip(), "path": path,
                     "clients": clients, "rows_per_request": 1, "requests_per_run": n})
            for key, (path, body, headers) in bodies.items()
        ]
        ratios = [Ratio(k, "predict", f"{labels[k]} vs /predict, requests/s, {clients} clients", target=">= 0.9")
                  for k in bodies if k != "predict"]
        bench.compare(f"protocols_c{clients}", f"Protocols, {clients} concurrent clients, 1-row requests", variants,
                      metric="req_s", unit="requests/s", better="higher", ratios=ratios,
                      show=["p50_ms", "p99_ms", "server_cpu_us"], rounds=None if args.quick or clients == 1 else args.protocol_rounds)


def run_overload(bench, args: argparse.Namespace, bundle: str, body: str) -> None:
    """Far past capacity: many connections against a short queue; accepted and refused requests/s, p99."""
    from _method import Variant

    port = free_port()
    rows = args.overload_queue_rows
    server = start_server(bundle, port, list(args.server_args), {"DASK_DASKML_SCALE__SERVE__MAX_QUEUE_ROWS": str(rows)})
    try:
        clients = args.overload_clients
        n = args.requests * 2
        bench.compare(
            f"overload_c{clients}", f"Overload: {clients} connections, 1-row requests, serve.max-queue-rows={rows}",
            [Variant("overload", _load_run(port, body, clients, 1, n, args.time_limit, overload=True, client=args.client),
                     "every request gets 200 or 503 + Retry-After at once",
                     {"server": "python -m daskml_scale.serving BUNDLE", "max_queue_rows": rows, "clients": clients,
                      "requests_per_run": n})],
            metric="req_s", unit="accepted requests/s", better="higher", show=["refused_s", "p50_ms", "p99_ms"],
            notes=["p99 target for the accepted requests while overloaded: under 100 ms"],
        )
    finally:
        _stop({"overload": server})


def run_headline(bench, args: argparse.Namespace, ports: dict[str, int], body: str) -> None:
    """The two figures of the serving targets, each against the per-request baseline:
    a single client's latency (sequential keep-alive requests, p50 and p99), and
    requests/s with p99 at ``--wide-clients`` (256) connections; 1-row JSON requests."""
    from _method import Ratio, Variant

    labels = {"per_request": "one model call per request (--no-micro-batching)",
              "batched": "micro-batching (the default)",
              "plain": "micro-batching, a bundle without a transform (the NumPy path)"}
    flags = {"per_request": ["--no-micro-batching"], "batched": [], "plain": []}

    def variants(clients: int, n: int) -> list:
        return [Variant(mode, _load_run(port, body, clients, 1, n, args.time_limit, client=args.client), labels[mode],
                        {"server": f"python -m daskml_scale.serving {'plain.bundle' if mode == 'plain' else 'BUNDLE'} "
                                   f"{' '.join([*flags[mode], *args.server_args])}".strip(),
                         "clients": clients, "rows_per_request": 1, "requests_per_run": n,
                         "body": "JSON list of one diamonds record", "generator": args.client})
                for mode, port in ports.items()]

    n = args.latency_requests
    ratios = [Ratio("batched", "per_request", "a single client's p50: micro-batching vs per-request")]
    if "plain" in ports:
        ratios.append(Ratio("plain", "batched", "a single client's p50: a bundle without a transform vs with one"))
    bench.compare("latency_c1", "Single-client latency: sequential keep-alive requests, 1 row each", variants(1, n),
                  metric="p50_ms", unit="ms", better="lower", ratios=ratios, show=["p99_ms", "req_s"],
                  notes=["target: a single client's p50 under 1.5 ms (the load generator's time included)"])
    wide = args.wide_clients
    n = max(args.requests, 4 * wide) * 2
    ratios = [Ratio("batched", "per_request", f"{wide} connections, 1-row requests: micro-batched requests/s vs "
                    "per-request", target=">= 1.3x")]
    if "plain" in ports:
        ratios.append(Ratio("plain", "batched", f"{wide} connections: a bundle without a transform vs with one"))
    bench.compare(f"wide_c{wide}", f"REST, {wide} connections, 1 row per request", variants(wide, n),
                  metric="req_s", unit="requests/s", better="higher", ratios=ratios,
                  show=["p50_ms", "p99_ms", "mean_batch_rows"],
                  notes=[f"target: 10,000 requests/s at p99 under 50 ms at {wide} connections"])


def run_matrix(args: argparse.Namespace) -> int:
    from _method import Benchmark, Ratio, Variant

    from daskml_scale.datasets import diamonds

    bench = Benchmark.from_args("serving", args, description="REST serving: micro-batching against per-request prediction")
    tmp = tempfile.mkdtemp(prefix="bench-serving-")
    bundle = args.bundle or make_bundle(tmp)
    rows_df = diamonds().drop(columns=["price"]).iloc[:100]
    bodies = {}
    for r in args.rows:
        p = Path(tmp) / f"body-{r}.json"
        p.write_bytes(json.dumps(rows_df.iloc[:r].to_dict("records")).encode())
        bodies[r] = str(p)
    modes = {"per_request": ["--no-micro-batching"], "batched": []}
    if args.protocols_only:
        modes.pop("per_request")
    labels = {"per_request": "one model call per request (--no-micro-batching)",
              "batched": "micro-batching (the default)"}
    servers, ports = {}, {}
    try:
        for mode, flags in modes.items():  # both up for the whole run, so that the modes can take turns
            ports[mode] = free_port()
            servers[mode] = start_server(bundle, ports[mode], [*flags, *args.server_args])
        if not (args.no_plain or args.protocols_only or args.bundle):
            ports["plain"] = free_port()  # a bundle without a transform: the NumPy path end to end
            servers["plain"] = start_server(make_bundle(tmp, transform=False), ports["plain"], list(args.server_args))
        generator = ("a minimal asyncio HTTP/1.1 client (uvloop), a few microseconds of CPU per request"
                     if args.client == "raw" else "aiohttp (or httpx)")
        bench.note(f"{os.cpu_count()} cores shared by the servers (idle while another is measured) and the "
                   f"load generator in another process: {generator}, one keep-alive connection per client")
        top = max(args.clients)
        if not args.protocols_only:
            run_headline(bench, args, ports, bodies[1] if 1 in bodies else bodies[min(bodies)])
        if not args.no_protocols:
            run_protocols(bench, args, ports["batched"], protocol_bodies(tmp, rows_df, bundle), args.server_args,
                          pid=servers["batched"].pid)
        if not args.no_overload:
            run_overload(bench, args, bundle, bodies[min(bodies)])
        if args.protocols_only:
            return _finish(bench, servers)
        for clients in args.clients:
            for r in args.rows:
                n = args.requests if r == 1 else max(args.requests // 4, 50)
                variants = [
                    Variant(mode, _load_run(ports[mode], bodies[r], clients, r, n, args.time_limit, client=args.client),
                            labels[mode],
                            {"server": f"python -m daskml_scale.serving BUNDLE {' '.join([*flags, *args.server_args])}".strip(),
                             "clients": clients, "rows_per_request": r, "requests_per_run": n,
                             "time_limit_s": args.time_limit, "body": "JSON list of diamonds records"})
                    for mode, flags in modes.items()
                ]
                ratio = Ratio("batched", "per_request",
                              f"REST, {clients} clients, {r}-row requests: micro-batched rows/s vs per-request",
                              target=">= 5x" if clients == top else None, headline=clients == top)
                bench.compare(
                    f"c{clients}_r{r}", f"REST, {clients} concurrent clients, {r} row(s) per request",
                    variants, metric="rows_s", unit="rows/s", better="higher", ratios=[ratio],
                    show=["req_s", "p50_ms", "p99_ms", "mean_batch_rows"],
                )
    finally:
        _stop(servers)
    bench.write()
    return bench.exit_code()


def _stop(servers: dict) -> None:
    for server in servers.values():
        if server.poll() is None:
            server.terminate()
    for server in servers.values():
        server.wait(timeout=30)


def _finish(bench, servers: dict) -> int:
    _stop(servers)
    bench.write()
    return bench.exit_code()


def main() -> int:
    from _method import add_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url")
    p.add_argument("--body")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 100])
    p.add_argument("--requests", type=int, default=4000, help="requests per single-row run (100-row runs: 1/4)")
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--bundle", default=None, help="serve this bundle instead of training a small one")
    p.add_argument("--frameworks", action="store_true", help="only compare Starlette and FastAPI overhead")
    p.add_argument("--headers", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-protocols", action="store_true", help="skip the v2 / TF Serving / MLflow comparison")
    p.add_argument("--protocols-only", action="store_true",
                   help="only the v2 / TF Serving / MLflow comparison and the overload run")
    p.add_argument("--overload", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-overload", action="store_true", help="skip the overload run")
    p.add_argument("--protocol-rounds", type=int, default=11,
                   help="interleaved rounds of the protocol comparison with many clients (default 11)")
    p.add_argument("--overload-clients", type=int, default=256, help="connections of the overload run (default 256)")
    p.add_argument("--overload-queue-rows", type=int, default=64,
                   help="the overload server's serve.max-queue-rows (default 64)")
    p.add_argument("--client", choices=sorted(GENERATORS), default="raw",
                   help="the load generator: raw (a minimal asyncio HTTP/1.1 client, the default) or aiohttp")
    p.add_argument("--latency-requests", type=int, default=3000,
                   help="sequential requests per single-client latency run (default 3000)")
    p.add_argument("--wide-clients", type=int, default=256,
                   help="connections of the wide cell, against the per-request baseline (default 256)")
    p.add_argument("--no-plain", action="store_true",
                   help="no third server with a bundle without a transform in the headline cells")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra server flags, last")
    add_arguments(p)
    args = p.parse_args()
    if args.load:
        args.clients = args.clients[0]
        load_main(args)
        return 0
    if args.frameworks:
        frameworks_main()
        return 0
    if args.quick and args.requests == p.get_default("requests"):
        args.requests = 200
    if args.quick and args.latency_requests == p.get_default("latency_requests"):
        args.latency_requests = 300
    return run_matrix(args)


if __name__ == "__main__":
    sys.exit(main())
