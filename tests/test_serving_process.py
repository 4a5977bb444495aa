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

from .conftest import free_port
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
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
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
