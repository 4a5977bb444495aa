"""Online serving: the app in-process (httpx + ASGI) and a real server process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.bundle import load_bundle, save_bundle
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform
from daskml_scale.serving import create_app
from daskml_scale.serving.collector import SERVING_GC_THRESHOLD
from daskml_scale.serving.batcher import MicroBatcher
from daskml_scale.serving.inputs import RequestError

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return diamonds().iloc[:3000]


@pytest.fixture(scope="module")
def bundle_url(tmp_path_factory, table) -> str:
    """A tiny MLP trained a few steps with plain Keras, saved as a bundle."""
    import keras

    pre = daskml_scale.Preprocessor(
        target="log_price", numeric=[*DIAMONDS_NUMERIC, "volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=diamonds_transform,
    ).fit(table)
    X, y = pre.transform(table)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((X.shape[1],)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    model.fit(X, y, epochs=1, batch_size=256, steps_per_epoch=5, verbose=0)
    url = str(tmp_path_factory.mktemp("serving") / "diamonds.bundle")
    return save_bundle(model, pre, url, training_summary={"steps": 5})


@pytest.fixture(scope="module")
def bundle(bundle_url):
    return load_bundle(bundle_url)


def _rows(table: pd.DataFrame, start: int, n: int) -> list[dict[str, Any]]:
    """Records as a client sends them: no target."""
    return table.drop(columns=["price"]).iloc[start : start + n].to_dict("records")


@contextlib.asynccontextmanager
async def served(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serving.test", timeout=60) as c:
            deadline = time.monotonic() + 60
            while True:
                r = await c.get("/health")
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            yield c


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


# ------------------------------------------------------------------------ in process
def test_predict_json_equals_predict_frame_in_order_with_ids(bundle, table):
    rows = _rows(table, 100, 37)

    async def go():
        async with served(create_app(bundle)) as c:
            r = await c.post("/predict?id=id", json=rows)
            assert r.status_code == 200, r.text
            return r.json()

    out = asyncio.run(go())
    expected = bundle.predict_frame(pd.DataFrame(rows))
    assert [o["id"] for o in out] == [r["id"] for r in rows]
    got = np.array([o["prediction"] for o in out])
    np.testing.assert_allclose(got, expected["prediction"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert set(out[0]) == {"id", "prediction"}


def test_predict_csv_answers_csv_with_configured_id(bundle, table):
    body = table.iloc[200:260].to_csv(index=False)  # with the price column: it is ignored

    async def go():
        async with served(create_app(bundle, id_column="id")) as c:
            r = await c.post("/predict", content=body, headers={"content-type": "text/csv"})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/csv")
            return r.text

    out = pd.read_csv(io.StringIO(asyncio.run(go())))
    assert list(out.columns) == ["id", "prediction"]
    assert out["id"].tolist() == table["id"].iloc[200:260].tolist()
    expected = bundle.predict_frame(table.iloc[200:260].drop(columns=["price"]))
    np.testing.assert_allclose(out["prediction"].to_numpy(), expected["prediction"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_predictions_equal_distributed_predict(client, bundle, table):
    import dask.dataframe as dd

    from daskml_scale.predict import predict

    part = table.drop(columns=["price"]).iloc[:50].reset_index(drop=True)
    expected = predict(bundle, dd.from_pandas(part, npartitions=2)).compute()

    async def go():
        async with served(create_app(bundle)) as c:
            # half as one request, half as single-row requests sent together
            a = await c.post("/predict", json=part.iloc[:25].to_dict("records"))
            singles = await asyncio.gather(*[c.post("/predict", json=[r]) for r in part.iloc[25:].to_dict("records")])
            return a.json() + [s.json()[0] for s in singles]

    out = asyncio.run(go())
    np.testing.assert_allclose(
        [o["prediction"] for o in out], expected["prediction"].to_numpy(), rtol=1e-5, atol=1e-6
    )


def _bad_cases(table: pd.DataFrame) -> list[tuple[str, dict[str, Any], int, str]]:
    good = _rows(table, 0, 2)
    missing = [dict(good[0]), good[1]]
    del missing[0]["carat"]
    wrong = [good[0], {**good[1], "depth": "deep"}]
    wrong_cat = [{**good[0], "cut": {"a": 1}}]
    csv_text = table.iloc[:3].to_csv(index=False)
    csv_wrong = csv_text.replace(str(table["carat"].iloc[1]), "heavy", 1)
    csv_missing = table.drop(columns=["clarity"]).iloc[:3].to_csv(index=False)
    j = {"content-type": "application/json"}
    c = {"content-type": "text/csv"}
    return [
        ("missing field", dict(content=json.dumps(missing), headers=j), 422, "carat"),
        ("wrong type", dict(content=json.dumps(wrong), headers=j), 422, "depth"),
        ("wrong type categorical", dict(content=json.dumps(wrong_cat), headers=j), 422, "cut"),
        ("empty body", dict(content=b"", headers=j), 400, "empty"),
        ("empty list", dict(content=b"[]", headers=j), 400, "at least one record"),
        ("malformed json", dict(content=b'[{"carat": 0.3,', headers=j), 400, "Malformed JSON"),
        ("not a list", dict(content=b'"hello"', headers=j), 400, "list of records"),
        ("not records", dict(content=b"[1, 2]", headers=j), 400, "Record 0"),
        ("empty csv", dict(content=b"", headers=c), 400, "empty"),
        ("malformed csv", dict(content=b'carat,cut\n0.3,"Ideal\n', headers=c), 400, "Malformed CSV"),
        ("csv header only", dict(content=csv_text.splitlines()[0].encode(), headers=c), 400, "no rows"),
        ("csv wrong type", dict(content=csv_wrong.encode(), headers=c), 422, "carat"),
        ("csv missing column", dict(content=csv_missing.encode(), headers=c), 422, "clarity"),
        ("missing id", dict(content=json.dumps(good), headers=j, params={"id": "order_no"}), 422, "order_no"),
        ("content type", dict(content=b"<rows/>", headers={"content-type": "application/xml"}), 415, "xml"),
        ("too large", dict(content=json.dumps(_rows(table, 0, 400)), headers=j), 413, "limit"),
    ]


def test_every_bad_input_gets_its_4xx_and_the_server_keeps_serving(bundle, table):
    good = _rows(table, 10, 3)
    cases = _bad_cases(table)

    async def go():
        async with served(create_app(bundle, max_body_bytes=50_000)) as c:
            for name, kwargs, status, words in cases:
                r = await c.post("/predict", **kwargs)
                assert r.status_code == status, (name, r.status_code, r.text)
                body = r.json()
                assert words in body["error"], (name, body)
                assert body["status"] == status
                ok = await c.post("/predict", json=good)
                assert ok.status_code == 200, (name, ok.text)
                assert len(ok.json()) == 3
            m = (await c.get("/metrics")).text
            return m

    m = asyncio.run(go())
    assert metric(m, 'daskml_scale_request_errors_total{endpoint="/predict",status="422"}') >= 6
    assert metric(m, 'daskml_scale_requests_total{endpoint="/predict",method="POST",status="200"}') == len(cases)


def test_classification_answers_probabilities_and_labels(tmp_path, table):
    import keras

    pre = daskml_scale.Preprocessor(
        target="cut", numeric=["carat", "depth", "table"], categorical=["color"],
    ).fit(table)
    X, _ = pre.transform(table)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(len(pre.classes_), activation="softmax")])
    b = load_bundle(save_bundle(model, pre, str(tmp_path / "cut.bundle")))
    rows = table[["id", "carat", "depth", "table", "color"]].iloc[:12].to_dict("records")

    async def go():
        async with served(create_app(b)) as c:
            j = await c.post("/predict?id=id", json=rows)
            csv = await c.post("/predict", content=pd.DataFrame(rows).to_csv(index=False), headers={"content-type": "text/csv"})
        return j, csv

    j, csv = asyncio.run(go())
    assert j.status_code == 200 and csv.status_code == 200, (j.text, csv.text)
    expected = b.predict_frame(pd.DataFrame(rows))
    got = pd.DataFrame(j.json())
    assert list(got.columns) == ["id", *b.output_names]
    assert got["label"].tolist() == expected["label"].tolist()
    probas = [n for n in b.output_names if n.startswith("proba_")]
    np.testing.assert_allclose(got[probas].to_numpy(), expected[probas].to_numpy(), rtol=1e-5, atol=1e-6)
    from_csv = pd.read_csv(io.StringIO(csv.text))
    assert from_csv["label"].tolist() == expected["label"].tolist()


def test_null_numbers_are_imputed_and_unknown_fields_ignored(bundle, table):
    rows = _rows(table, 40, 4)
    rows[1]["depth"] = None
    rows[2]["shop"] = "Antwerp"  # not in the schema: ignored
    rows[3]["price"] = 1000  # an optional schema field some records have

    async def go():
        async with served(create_app(bundle)) as c:
            return await c.post("/predict", json=rows)

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    frame = pd.DataFrame(rows).drop(columns=["shop", "price"])
    expected = bundle.predict_frame(frame)["prediction"].to_numpy()
    np.testing.assert_allclose([o["prediction"] for o in r.json()], expected, rtol=1e-5, atol=1e-6)


def test_field_of_wrong_type_is_named_in_the_answer(bundle, table):
    rec = {**_rows(table, 0, 1)[0], "x": [1, 2]}

    async def go():
        async with served(create_app(bundle)) as c:
            return await c.post("/predict", json=[_rows(table, 1, 1)[0], rec])

    r = asyncio.run(go())
    assert r.status_code == 422
    assert r.json()["field"] == "x"
    assert "Record 1" in r.json()["error"]


def test_concurrent_requests_are_coalesced(bundle, table):
    rows = _rows(table, 0, 64)
    expected = bundle.predict_frame(pd.DataFrame(rows))["prediction"].to_numpy()

    async def go(micro_batching: bool):
        app = create_app(bundle, micro_batching=micro_batching, max_wait_ms=20)
        async with served(app) as c:
            before = metric((await c.get("/metrics")).text, "daskml_scale_batch_rows_count")
            answers = await asyncio.gather(*[c.post("/predict", json=[r]) for r in rows])
            after = (await c.get("/metrics")).text
        assert all(a.status_code == 200 for a in answers)
        got = np.array([a.json()[0]["prediction"] for a in answers])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        return metric(after, "daskml_scale_batch_rows_count") - before, metric(after, "daskml_scale_batch_rows_sum")

    batches, rows_sum = asyncio.run(go(True))
    assert rows_sum >= 64
    assert batches < 64 / 4, f"64 concurrent requests made {batches} model calls"
    batches_off, _ = asyncio.run(go(False))
    assert batches_off == 64


def test_a_failing_request_does_not_fail_the_batch_it_shares():
    """A batch that fails is retried request by request: only the bad one gets the error."""

    def build(blocks):
        return pd.DataFrame([r for b in blocks for r in b.rows])

    def predict(frame):
        if (frame["x"] < 0).any():
            raise RequestError(422, "negative x", field="x")
        return pd.DataFrame({"prediction": frame["x"] * 2.0})

    async def go():
        b = MicroBatcher(predict, build, max_batch_rows=100, max_wait_ms=50)
        b.start()
        try:
            with b.arrival(), b.arrival():  # hold the batch open until all are queued
                tasks = [asyncio.ensure_future(b.submit([{"x": float(i if i != 3 else -1)}], 1)) for i in range(6)]
                await asyncio.sleep(0)
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await b.stop()
        return results, b.metrics

    results, m = asyncio.run(go())
    assert isinstance(results[3], RequestError) and results[3].status == 422
    assert [r["prediction"][0] for i, r in enumerate(results) if i != 3] == [0.0, 2.0, 4.0, 8.0, 10.0]
    assert m.batch_requests.count == 5  # the failed batch of 6, retried as 6 single calls, 5 succeed


def test_mixed_requests_in_one_batch_each_get_their_own_answer(bundle, table):
    """One request brings the price (the transform then makes a target), one does not."""
    with_price = table.iloc[:5].to_dict("records")
    without = _rows(table, 5, 5)

    async def go():
        async with served(create_app(bundle, max_wait_ms=20)) as c:
            a, b = await asyncio.gather(c.post("/predict", json=with_price), c.post("/predict", json=without))
        return a, b

    a, b = asyncio.run(go())
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    expected = bundle.predict_frame(table.iloc[:10].drop(columns=["price"]))["prediction"].to_numpy()
    got = [o["prediction"] for o in a.json() + b.json()]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_info_openapi_metrics(bundle):
    async def go():
        async with served(create_app(bundle)) as c:
            return (await c.get("/info")), (await c.get("/openapi.json")), (await c.get("/metrics"))

    info, spec, metrics = asyncio.run(go())
    i = info.json()
    assert i["output_names"] == ["prediction"] and i["task"] == "regression"
    assert i["input_schema"]["carat"].startswith("float")
    assert "volume" in i["feature_names"] and i["training_summary"] == {"steps": 5}
    assert i["versions"]["keras"] and i["serving"]["micro_batching"] is True
    assert i["serving"]["max_batch_rows"] == daskml_scale.config.get("serve.max-batch-rows")
    s = spec.json()
    assert s["openapi"].startswith("3.")
    assert {"/predict", "/health", "/info", "/jobs", "/jobs/{job_id}", "/metrics"} <= set(s["paths"])
    record = s["components"]["schemas"]["Record"]
    assert "carat" in record["required"] and "price" not in record["required"]
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("daskml_scale_requests_total", "daskml_scale_request_latency_seconds_bucket",
                 "daskml_scale_batch_rows_bucket", "daskml_scale_request_errors_total"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in metrics.text


def test_health_reports_a_bundle_that_fails_to_load(tmp_path):
    bad = tmp_path / "not-a.bundle"
    bad.write_bytes(b"certainly not a zip file")

    async def go():
        app = create_app(str(bad))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                for _ in range(200):
                    h = await c.get("/health")
                    if h.json()["status"] != "loading":
                        break
                    await asyncio.sleep(0.05)
                p = await c.post("/predict", json=[{"carat": 1.0}])
                return h, p

    h, p = asyncio.run(go())
    assert h.status_code == 503
    assert h.json()["live"] is True and h.json()["ready"] is False and h.json()["status"] == "failed"
    assert "BundleError" in h.json()["error"]
    assert p.status_code == 503 and "failed to load" in p.json()["error"]


def test_jobs_without_a_cluster_and_bad_job_requests(bundle):
    async def go():
        out = {}
        async with served(create_app(bundle)) as c:
            out["no cluster"] = await c.post("/jobs", json={"input": "a/*.csv", "output": "b/"})
            out["unknown job"] = await c.get("/jobs/0123")
        async with served(create_app(bundle, scheduler="tcp://127.0.0.1:1")) as c:
            out["no output"] = await c.post("/jobs", json={"input": "a/*.csv"})
            out["bad format"] = await c.post("/jobs", json={"input": "a", "output": "b", "format": "xlsx"})
            out["unknown key"] = await c.post("/jobs", json={"input": "a", "output": "b", "pickle": "..."})
            out["malformed"] = await c.post("/jobs", content=b"{", headers={"content-type": "application/json"})
        return out

    out = asyncio.run(go())
    assert out["no cluster"].status_code == 503 and "scheduler" in out["no cluster"].json()["error"]
    assert out["unknown job"].status_code == 404
    assert out["no output"].status_code == 422 and out["no output"].json()["field"] == "output"
    assert out["bad format"].status_code == 422
    assert out["unknown key"].status_code == 422 and "pickle" in out["unknown key"].json()["error"]
    assert out["malformed"].status_code == 400


async def _poll_job(c: httpx.AsyncClient, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = (await c.get(f"/jobs/{job_id}")).json()
        if j["state"] in ("done", "failed"):
            return j
        await asyncio.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {j['state']} after {timeout}s")


@pytest.mark.slow
def test_jobs_run_predict_files_on_the_cluster(client, bundle, table, tmp_path):
    from daskml_scale.datasets import write_csv_shards

    write_csv_shards(table.iloc[:300], str(tmp_path / "in"), 3)
    scheduler = client.scheduler.address

    async def go():
        # jobs are on with a token and URL prefixes only (test_serving_auth.py)
        app = create_app(bundle, scheduler=scheduler, token="job-token", jobs_allow_read=[str(tmp_path)],
                         jobs_allow_write=[str(tmp_path)])
        async with served(app) as c:
            c.headers["authorization"] = "Bearer job-token"
            r = await c.post("/jobs", json={"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "keep": ["id"]})
            assert r.status_code == 202, r.text
            assert r.headers["location"] == f"/jobs/{r.json()['id']}"
            job = await _poll_job(c, r.json()["id"])
            listed = (await c.get("/jobs")).json()["jobs"]
            missing = await c.post("/jobs", json={"input": str(tmp_path / "nothing-*.csv"), "output": str(tmp_path / "o2")})
            failed = await _poll_job(c, missing.json()["id"])
            return job, listed, failed

    job, listed, failed = asyncio.run(go())
    assert job["state"] == "done", job
    assert len(job["report"]["done"]) == 3 and not job["report"]["failed"]
    assert sum(e["rows"] for e in job["report"]["done"]) == 300
    assert [j["id"] for j in listed][0] == job["id"]
    out = pd.concat([pd.read_csv(e["output"]) for e in job["report"]["done"]]).sort_values("id")
    expected = bundle.predict_frame(table.iloc[:300].drop(columns=["price"]))
    np.testing.assert_allclose(out["prediction"].to_numpy(), expected["prediction"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert failed["state"] == "failed" and failed["error"]


def test_the_collector_of_a_serving_process_is_tuned_and_a_users_setting_kept():
    code = """
import gc
from daskml_scale.serving.collector import SERVING_GC_THRESHOLD, tune_collector
out = []
for before in ((700, 10, 10), (50_000, 5, 5), (0, 10, 10)):
    gc.set_threshold(*before)
    tune_collector()
    out.append(list(gc.get_threshold()))
print(out, gc.get_freeze_count() > 0, SERVING_GC_THRESHOLD)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n = SERVING_GC_THRESHOLD
    # the default raised (the older generations' own settings kept); a larger one, or the collector off: left as is
    assert out.stdout.strip() == f"[[{n}, 10, 10], [50000, 5, 5], [0, 10, 10]] True {n}"
    assert gc.get_threshold()[0] != 0  # this test process's collector untouched


def test_import_daskml_scale_does_not_import_starlette():
    code = "import sys, daskml_scale; daskml_scale.serve; daskml_scale.create_app; print('starlette' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -------------------------------------------------------------------- a real process
SERVER_TOKEN = "real-server-token"
AUTH = {"authorization": f"Bearer {SERVER_TOKEN}"}


@pytest.fixture(scope="module")
def server(bundle_url, client):
    """``python -m daskml_scale.serving`` on a free loopback port, pointed at the cluster."""
    port = free_port()
    import tempfile

    tmp = tempfile.gettempdir()  # the jobs' URLs: pytest's tmp_path is under it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DASKML_SCALE_SERVE_TOKEN": SERVER_TOKEN,
           "DASK_DASKML_SCALE__SERVE__JOBS__ALLOW_READ": repr([tmp]),
           "DASK_DASKML_SCALE__SERVE__JOBS__ALLOW_WRITE": repr([tmp])}
    cmd = [
        sys.executable, "-m", "daskml_scale.serving", bundle_url, "--host", "127.0.0.1", "--port", str(port),
        "--scheduler", client.scheduler.address, "--id-column", "id", "--max-body-bytes", "100000",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready after 120 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_real_server_predicts_rejects_and_keeps_serving(server, bundle, table):
    rows = _rows(table, 500, 20)
    expected = bundle.predict_frame(pd.DataFrame(rows))["prediction"].to_numpy()
    with httpx.Client(base_url=server, timeout=60, headers=AUTH) as c:
        h = c.get("/health").json()
        assert h["ready"] is True and h["content_hash"] == bundle.content_hash
        r = c.post("/predict", json=rows)
        assert r.status_code == 200
        assert [o["id"] for o in r.json()] == [x["id"] for x in rows]  # --id-column id
        np.testing.assert_allclose([o["prediction"] for o in r.json()], expected, rtol=1e-5, atol=1e-6)
        csv = c.post("/predict", content=pd.DataFrame(rows).to_csv(index=False), headers={"content-type": "text/csv"})
        np.testing.assert_allclose(pd.read_csv(io.StringIO(csv.text))["prediction"], expected, rtol=1e-5, atol=1e-6)
        for name, kwargs, status, words in _bad_cases(table):
            if name == "too large":
                kwargs = dict(content=json.dumps(_rows(table, 0, 1000)), headers={"content-type": "application/json"})
            bad = c.post("/predict", **kwargs)
            assert bad.status_code == status and words in bad.json()["error"], (name, bad.text)
            assert c.post("/predict", json=rows[:2]).status_code == 200, name
        serving = c.get("/info").json()["serving"]
        assert serving["jobs"] is True
        # a process that only serves: its collector frozen after loading, the youngest generation's threshold raised
        assert serving["gc"]["frozen"] > 10_000 and serving["gc"]["threshold"][0] == SERVING_GC_THRESHOLD
        assert c.get("/openapi.json").status_code == 200
        m = c.get("/metrics").text
        assert metric(m, 'daskml_scale_request_errors_total{endpoint="/predict",status="413"}') == 1


@pytest.mark.slow
def test_real_server_coalesces_concurrent_clients(server, table):
    rows = _rows(table, 0, 48)

    async def go():
        async with httpx.AsyncClient(base_url=server, timeout=60, headers=AUTH) as c:
            m0 = (await c.get("/metrics")).text
            answers = await asyncio.gather(*[c.post("/predict", json=[r]) for r in rows])
            m1 = (await c.get("/metrics")).text
        return m0, answers, m1

    m0, answers, m1 = asyncio.run(go())
    assert [a.json()[0]["id"] for a in answers] == [r["id"] for r in rows]
    calls = metric(m1, "daskml_scale_batch_rows_count") - metric(m0, "daskml_scale_batch_rows_count")
    assert 0 < calls < len(rows), f"{len(rows)} concurrent requests made {calls} model calls"


@pytest.mark.slow
def test_real_server_runs_a_job_on_the_cluster(server, table, tmp_path):
    from daskml_scale.datasets import write_csv_shards

    write_csv_shards(table.iloc[:200], str(tmp_path / "in"), 2)
    with httpx.Client(base_url=server, timeout=60, headers=AUTH) as c:
        r = c.post("/jobs", json={"input": str(tmp_path / "in" / "*.csv"), "output": str(tmp_path / "out"), "format": "parquet"})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 180
        while (job := c.get(f"/jobs/{r.json()['id']}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
    assert job["state"] == "done", (job["error"], job["report"])
    assert sorted(Path(e["output"]).name for e in job["report"]["done"]) == ["part-000.parquet", "part-001.parquet"]
    assert sum(len(pd.read_parquet(e["output"])) for e in job["report"]["done"]) == 200


def _broken_transform(df: pd.DataFrame) -> pd.DataFrame:
    raise ValueError("this transform is broken")


def test_a_warm_up_that_fails_is_reported_at_startup(bundle_url):
    """A bundle that cannot predict a made-up row of valid columns: /health says so at once,
    with the cause, instead of the first request failing."""

    async def go():
        app = create_app(bundle_url, transform=_broken_transform)
        async with served(app) as c:
            for _ in range(200):
                h = await c.get("/health")
                if h.json()["status"] != "loading":
                    return h
                await asyncio.sleep(0.05)
            return h

    h = asyncio.run(go())
    assert h.status_code == 503
    assert h.json()["ready"] is False and h.json()["status"] == "failed"
    assert "warm-up" in h.json()["error"] and "this transform is broken" in h.json()["error"]
