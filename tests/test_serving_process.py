"""A real server process: SIGHUP reloads a model from its URL, SIGTERM finishes the
requests in flight before the process exits."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from daskml_scale.bundle import load_bundle

from .conftest import _stop, free_port
from .test_serving_models import _frame, folder, table  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sighup_reloads_and_sigterm_lets_the_requests_in_flight_finish(folder, table, tmp_path):  # noqa: F811
    url = tmp_path / "price.bundle"
    shutil.copy(folder["price"], url)
    frame = _frame(table, 16)
    recs = frame.to_dict("records")
    v2 = load_bundle(folder["price2"]).predict_frame(frame)["prediction"].to_numpy()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # a short queue: the flood below is refused in part, with 503
    code = f"import daskml_scale; daskml_scale.serve({str(url)!r}, port={port}, max_queue_rows=4)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(proc, base)
        assert httpx.get(f"{base}/models").json()["models"][0]["version"] == "1"
        shutil.copy(folder["price2"], url)  # a new version at the same URL
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/models").json()["models"][0]["version"] != "2":
            assert time.monotonic() < deadline, httpx.get(f"{base}/models").text
            time.sleep(0.1)
        got = httpx.post(f"{base}/predict", json=recs).json()
        np.testing.assert_allclose([g["prediction"] for g in got], v2, rtol=1e-5, atol=1e-5)

        async def flood() -> tuple[list[tuple[int, httpx.Response]], list[str]]:
            answers: list[tuple[int, httpx.Response]] = []
            errors: list[str] = []
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as c:
                async def client(i: int) -> None:
                    while True:
                        try:
                            answers.append((i % len(recs), await c.post("/predict", json=[recs[i % len(recs)]])))
                        except httpx.TransportError as exc:  # the server has stopped: this client stops
                            errors.append(f"{type(exc).__name__}: {exc}")
                            return

                tasks = [asyncio.ensure_future(client(i)) for i in range(64)]
                await asyncio.sleep(2.0)
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait(tasks, timeout=60)
            return answers, errors

        answers, errors = asyncio.run(flood())
        # uvicorn shuts down gracefully, then raises the signal again: the process ends by SIGTERM
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(errors) == 64, errors  # each client stopped on the server's end, and only then
    ok = [(i, a) for i, a in answers if a.status_code == 200]
    refused = [a for _, a in answers if a.status_code != 200]
    assert ok and refused, (len(ok), len(refused))
    for i, a in ok:  # every answer that came is whole and right
        np.testing.assert_allclose(a.json()[0]["prediction"], v2[i], rtol=1e-5, atol=1e-5)
    for a in refused:  # over the queue's bound: 503 at once, with Retry-After
        assert a.status_code == 503 and a.headers["retry-after"] == "1" and "overloaded" in a.json()["error"], a.text
    # refused connections or requests the server never answered, never a cut-off body
    assert not [e for e in errors if "complete message body" in e], errors


def _wait_ready(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.2)


@pytest.mark.slow
def test_cli_serve_reloads_each_model_from_its_url_on_sighup_under_load(folder, table, tmp_path):  # noqa: F811
    """``daskml-scale serve NAME=URL NAME=URL``: the CLI loads each bundle, and SIGHUP
    reads each URL again while a client loop runs: every request 200, the answers turn
    into the new version's; a file that no longer loads leaves the version serving."""
    url = tmp_path / "price.bundle"
    shutil.copy(folder["price"], url)
    frame = _frame(table, 8)
    recs = frame.to_dict("records")
    v1 = load_bundle(folder["price"]).predict_frame(frame)["prediction"].to_numpy()
    v2 = load_bundle(folder["price2"]).predict_frame(frame)["prediction"].to_numpy()
    assert not np.allclose(v1, v2, rtol=1e-3)  # the two versions answer apart
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskml_scale.serving", f"price={url}", f"cut={folder['cut']}", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_ready(proc, base)
        models = {m["name"]: m for m in httpx.get(f"{base}/models").json()["models"]}
        assert set(models) == {"price", "cut"} and models["price"]["url"] == str(url)
        assert models["price"]["version"] == "1"

        # each request: (sent at, status, answer); the time the client first saw version 2
        seen: list[tuple[float, int, list[float] | str]] = []
        swapped: list[float] = []

        async def loop(stop: asyncio.Event) -> None:
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                async def one_client() -> None:
                    while not stop.is_set():
                        sent = time.monotonic()
                        r = await c.post("/predict", json=recs)
                        seen.append((sent, r.status_code, [g["prediction"] for g in r.json()]
                                     if r.status_code == 200 else r.text))
                await asyncio.gather(*[one_client() for _ in range(4)])

        async def reload_under_load() -> None:
            stop = asyncio.Event()
            task = asyncio.ensure_future(loop(stop))
            await asyncio.sleep(0.5)
            shutil.copy(folder["price2"], url)  # a new version at the same URL
            os.kill(proc.pid, signal.SIGHUP)
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                deadline = time.monotonic() + 60
                while {m["name"]: m for m in (await c.get("/models")).json()["models"]}["price"]["version"] != "2":
                    assert time.monotonic() < deadline, "SIGHUP did not bring version 2"
                    await asyncio.sleep(0.1)
            swapped.append(time.monotonic())
            await asyncio.sleep(0.5)
            stop.set()
            await task

        asyncio.run(reload_under_load())
        assert [s for _, s, _ in seen if s != 200] == [], [a for _, s, a in seen if s != 200][:3]
        seen.sort(key=lambda x: x[0])  # in the order sent (4 clients: answers may come back in another)
        answers = [np.asarray(a) for _, _, a in seen]
        is_v1 = [np.allclose(a, v1, rtol=1e-4, atol=1e-5) for a in answers]
        is_v2 = [np.allclose(a, v2, rtol=1e-4, atol=1e-5) for a in answers]
        odd = [(i, a.tolist()) for i, (a, x, y) in enumerate(zip(answers, is_v1, is_v2)) if not (x or y)]
        assert not odd, (odd[:3], v1.tolist(), v2.tolist())  # each answer whole, from one version
        assert is_v1[0] and is_v2[-1]
        # a request sent once the new version had the name was answered by it; the old version
        # answered only requests that reached it before (they finish there)
        late = [v for (sent, _, _), v in zip(seen, is_v2) if sent > swapped[0]]
        assert late and all(late)

        # a file that no longer loads: the error is reported, version 2 goes on serving
        url.write_bytes(b"not a bundle")
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not {m["name"]: m for m in httpx.get(f"{base}/models").json()["models"]}["price"]["reason"]:
            assert time.monotonic() < deadline, "the failed reload was not reported"
            time.sleep(0.1)
        price = {m["name"]: m for m in httpx.get(f"{base}/models").json()["models"]}["price"]
        assert price["version"] == "2" and price["state"] == "READY" and "not a daskml_scale bundle" in price["reason"]
        got = httpx.post(f"{base}/predict", json=recs)
        assert got.status_code == 200
        np.testing.assert_allclose([g["prediction"] for g in got.json()], v2, rtol=1e-4, atol=1e-5)
        # the repository endpoint reads the URL again too: back to a good file, version 3
        shutil.copy(folder["price"], url)
        r = httpx.post(f"{base}/v2/repository/models/price/load", timeout=60)
        assert r.status_code == 200, r.text
        assert {m["name"]: m for m in httpx.get(f"{base}/models").json()["models"]}["price"]["version"] == "3"
        got = httpx.post(f"{base}/predict", json=recs).json()
        np.testing.assert_allclose([g["prediction"] for g in got], v1, rtol=1e-4, atol=1e-5)
    finally:
        _stop([proc])
