"""Overload without loss: a bounded queue, and 503 with Retry-After at once beyond it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pandas as pd

from daskml_scale.serving import create_app
from daskml_scale.serving.batcher import MicroBatcher
from daskml_scale.serving.errors import OverloadedError

from .test_serving_protocols import _expected, _frame, bundle, bundle_url, close, run, table, v2_columns  # noqa: F401


def test_the_queue_is_bounded_and_refusals_are_immediate():
    def build(blocks):
        return pd.DataFrame([r for b in blocks for r in b.rows])

    def predict(frame):
        time.sleep(0.05)  # a slow model: requests pile up
        return pd.DataFrame({"prediction": frame["x"] * 2.0})

    async def go():
        b = MicroBatcher(predict, build, max_batch_rows=100, max_wait_ms=0, max_queue_rows=4)
        b.start()
        try:
            t0 = time.perf_counter()
            tasks = [asyncio.ensure_future(b.submit([{"x": float(i)}], 1)) for i in range(20)]
            done = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await b.stop()
        return done, b

    done, b = asyncio.run(go())
    ok = [(i, r) for i, r in enumerate(done) if not isinstance(r, BaseException)]
    refused = [r for r in done if isinstance(r, BaseException)]
    assert len(ok) == 4 and all(isinstance(r, OverloadedError) for r in refused), done
    assert all(r["prediction"] == [2.0 * i] for i, r in ok)
    assert refused[0].status == 503 and refused[0].headers() == [(b"retry-after", b"1")]
    assert b.metrics.overloaded.total() == 16 and b.queued_rows == 0 and b.idle


def test_overloaded_requests_get_503_with_retry_after_and_the_others_the_right_answer(bundle, table):
    frame = _frame(table, 0, 48)
    expected = _expected(bundle, frame)
    recs = frame.to_dict("records")

    async def go(c):
        calls = []
        for i in range(len(recs)):
            if i % 2:
                calls.append(c.post("/v2/models/diamonds/infer", json={"inputs": v2_columns(frame.iloc[[i]])}))
            else:
                calls.append(c.post("/predict", json=[recs[i]]))
        answers = await asyncio.gather(*calls)
        return answers, (await c.get("/metrics")).text

    answers, metrics = run(create_app(bundle, model_name="diamonds", max_queue_rows=2), go)
    statuses = {a.status_code for a in answers}
    assert statuses <= {200, 503} and statuses == {200, 503}, [a.text for a in answers][:3]
    for i, a in enumerate(answers):
        if a.status_code == 503:
            assert a.headers["retry-after"] == "1" and "overloaded" in a.json()["error"]
        else:
            got = a.json()[0]["prediction"] if i % 2 == 0 else a.json()["outputs"][0]["data"][0]
            close([got], expected[i : i + 1])
    refused = sum(a.status_code == 503 for a in answers)
    assert f"daskml_scale_overloaded_total {refused}" in metrics
    assert np.isfinite(expected).all()


def test_a_request_whose_client_has_gone_is_dropped_before_the_model_call():
    seen: list[float] = []

    def build(blocks):
        return pd.DataFrame([r for b in blocks for r in b.rows])

    def predict(frame):
        seen.extend(frame["x"].tolist())
        time.sleep(0.1)
        return pd.DataFrame({"prediction": frame["x"] * 2.0})

    async def gone_soon():
        await asyncio.sleep(0.02)
        return {"type": "http.disconnect"}

    async def stays():
        await asyncio.sleep(3600)

    async def go():
        b = MicroBatcher(predict, build, max_batch_rows=1, max_wait_ms=0)
        b.start()
        try:
            first = asyncio.ensure_future(b.submit([{"x": 1.0}], 1))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(b.submit([{"x": 2.0}], 1, stays))  # waits, its client stays
            left = asyncio.ensure_future(b.submit([{"x": 3.0}], 1, gone_soon))  # waits, its client leaves
            return await asyncio.gather(first, second, left, return_exceptions=True), b
        finally:
            await b.stop()

    (first, second, left), b = asyncio.run(go())
    from daskml_scale.serving.errors import ClientGoneError

    assert first["prediction"] == [2.0] and second["prediction"] == [4.0]
    assert isinstance(left, ClientGoneError) and left.status == 499
    assert seen == [1.0, 2.0] and b.metrics.client_gone.total() == 1 and b.idle


def test_under_overload_the_end_of_a_batch_starts_the_next_in_the_same_turn_of_the_loop():
    """With refusals while a batch ran, the next batch is in the model thread by the time the
    first batch's requests resume (not a turn of the loop later); without refusals the
    collector starts it, and every request still gets its own answer in both cases."""
    import threading

    gates: list[threading.Event] = []

    def build(blocks):
        return pd.DataFrame([r for b in blocks for r in b.rows])

    def predict(frame):
        gate = threading.Event()
        gates.append(gate)
        gate.wait(30)  # released by the test
        return pd.DataFrame({"prediction": frame["x"] * 2.0})

    async def wait_for_batches(k: int) -> None:
        for _ in range(3000):
            if len(gates) >= k:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"{k} batches did not start")

    async def go(refuse: bool):
        gates.clear()
        b = MicroBatcher(predict, build, max_batch_rows=100, max_wait_ms=0, max_queue_rows=4)
        b.start()
        queued: list[asyncio.Future] = []

        async def meanwhile() -> None:
            await wait_for_batches(1)  # the first batch is in the model thread
            queued.extend(asyncio.ensure_future(b.submit([{"x": float(i)}], 1)) for i in (2, 3))
            await asyncio.sleep(0)
            if refuse:
                late = asyncio.ensure_future(b.submit([{"x": 9.0}], 2))  # 3 rows waiting + 2 > 4: refused
                await asyncio.sleep(0)
                assert isinstance(late.exception(), OverloadedError)
            gates[0].set()

        helper = asyncio.ensure_future(meanwhile())
        try:
            # this coroutine resumes in the turn after the batch's end, before the collector task would
            answer = await b.submit([{"x": 1.0}], 1)
            started_at_once = b._busy is not None  # the next batch is in the model thread already
            await helper
            await wait_for_batches(2)
            gates[1].set()
            rest = await asyncio.gather(*queued)
        finally:
            for g in gates:
                g.set()
            await b.stop()
        return answer, rest, started_at_once, b

    answer, rest, at_once, b = asyncio.run(go(refuse=True))
    assert at_once and b.refused == 1
    assert answer["prediction"] == [2.0] and [r["prediction"] for r in rest] == [[4.0], [6.0]]
    assert b.metrics.batch_requests.count == 2 and b.idle  # one batch of 1, one of 2
    answer, rest, at_once, b = asyncio.run(go(refuse=False))
    assert not at_once and b.refused == 0
    assert answer["prediction"] == [2.0] and [r["prediction"] for r in rest] == [[4.0], [6.0]]
    assert b.metrics.batch_requests.count == 2 and b.idle
