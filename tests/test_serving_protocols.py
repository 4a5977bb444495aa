"""The standard inference protocols (Open Inference Protocol v2, TensorFlow Serving REST,
MLflow scoring) against the same bundle as ``POST /predict``: real clients where one
exists (``tritonclient[http]`` against a real uvicorn server on loopback), plain httpx
with each protocol's documented request shapes for the others."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import threading
import time
from typing import Any, AsyncIterator, Iterator

import httpx
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.bundle import load_bundle, save_bundle
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform
from daskml_scale.serving import create_app

from .conftest import free_port

NAME = "diamonds"


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return diamonds().iloc[:2000]


@pytest.fixture(scope="module")
def bundle_url(tmp_path_factory, table) -> str:
    import keras

    pre = daskml_scale.Preprocessor(
        target="log_price", numeric=[*DIAMONDS_NUMERIC, "volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=diamonds_transform,
    ).fit(table)
    X, y = pre.transform(table)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    model.fit(X, y, epochs=1, batch_size=256, steps_per_epoch=3, verbose=0)
    return save_bundle(model, pre, str(tmp_path_factory.mktemp("protocols") / f"{NAME}.bundle"))


@pytest.fixture(scope="module")
def bundle(bundle_url):
    return load_bundle(bundle_url)


def _frame(table: pd.DataFrame, start: int, n: int) -> pd.DataFrame:
    """Rows as a client sends them: no target."""
    return table.drop(columns=["price"]).iloc[start : start + n].reset_index(drop=True)


def _expected(bundle, frame: pd.DataFrame) -> np.ndarray:
    return bundle.predict_frame(frame)["prediction"].to_numpy()


def close(got: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64).ravel(), expected, rtol=1e-5, atol=1e-5)


@contextlib.asynccontextmanager
async def served(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serving.test", timeout=60) as c:
            deadline = time.monotonic() + 60
            while (h := await c.get("/v2/health/ready")).status_code != 200:  # every model loaded
                assert "error" not in h.json() and time.monotonic() < deadline, h.text
                await asyncio.sleep(0.05)
            yield c


def run(app, fn) -> Any:
    """``fn(client)`` against the app, in-process."""

    async def go():
        async with served(app) as c:
            return await fn(c)

    return asyncio.run(go())


@contextlib.contextmanager
def real_server(app) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a thread of this process."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    base = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def v2_columns(frame: pd.DataFrame, shape_1: bool = False) -> list[dict[str, Any]]:
    """One v2 input per column, as MLServer's pandas codec writes them."""
    out = []
    for c in frame.columns:
        s = frame[c]
        if pd.api.types.is_float_dtype(s):
            dt, data = "FP64", s.tolist()
        elif pd.api.types.is_integer_dtype(s):
            dt, data = "INT64", s.tolist()
        else:
            dt, data = "BYTES", s.astype(str).tolist()
        out.append({"name": c, "datatype": dt, "shape": [len(s), 1] if shape_1 else [len(s)], "data": data})
    return out


# ------------------------------------------------------------------ v2: tritonclient
def test_tritonclient_against_a_real_server(bundle, table):
    """``InferenceServerClient`` as a Triton user calls it: health, metadata, then infer with
    one input per column (binary tensors, tritonclient's default, and JSON), the feature
    matrix, and the errors it raises."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    frame = _frame(table, 0, 25)
    expected = _expected(bundle, frame)
    X, _ = bundle.preprocessor.transform(frame, with_target=False)
    with real_server(create_app(bundle, model_name=NAME)) as url:
        c = triton.InferenceServerClient(url=url)
        try:
            assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(NAME)
            assert not c.is_model_ready("nope")
            assert c.get_server_metadata()["name"] == "daskml_scale"
            meta = c.get_model_metadata(NAME)
            assert meta["name"] == NAME and [o["name"] for o in meta["outputs"]] == ["prediction"]
            assert {i["name"] for i in meta["inputs"]} == {*DIAMONDS_NUMERIC, *DIAMONDS_CATEGORICAL}

            def inputs(binary: bool) -> list:
                out = []
                for col in meta["inputs"]:
                    name, dt = col["name"], col["datatype"]
                    vals = frame[name].to_numpy()
                    arr = vals.astype(np.float32 if dt.startswith("FP") else object).reshape(-1, 1)
                    if dt == "BYTES":
                        arr = np.array([str(v).encode() for v in vals], dtype=object).reshape(-1, 1)
                    t = triton.InferInput(name, list(arr.shape), "FP32" if dt.startswith("FP") else dt)
                    t.set_data_from_numpy(arr, binary_data=binary)
                    out.append(t)
                return out

            for binary in (True, False):
                res = c.infer(NAME, inputs(binary), request_id=f"r-{binary}",
                              outputs=[triton.InferRequestedOutput("prediction", binary_data=binary)])
                assert res.get_response()["id"] == f"r-{binary}"
                got = res.as_numpy("prediction")
                assert got.shape == (25, 1) and got.dtype == np.float32
                close(got, expected)
            res = c.infer(NAME, inputs(True), model_version="1")  # no outputs named: every one, binary
            close(res.as_numpy("prediction"), expected)

            feats = triton.InferInput("features", list(X.shape), "FP32")
            feats.set_data_from_numpy(X.astype(np.float32))
            res = c.infer(NAME, [feats])
            close(res.as_numpy("prediction"), bundle.predict_array(X).ravel())

            with pytest.raises(InferenceServerException) as err:
                c.infer(NAME, inputs(True)[1:])  # the first column left out
            assert err.value.status() == "422" and meta["inputs"][0]["name"] in err.value.message()
            with pytest.raises(InferenceServerException) as err:
                c.infer("nope", inputs(True))
            assert err.value.status() == "404" and NAME in err.value.message()
            narrow = triton.InferInput("features", [2, 3], "FP32")
            narrow.set_data_from_numpy(np.ones((2, 3), np.float32))
            with pytest.raises(InferenceServerException) as err:
                c.infer(NAME, [narrow])
            assert err.value.status() == "422" and str(X.shape[1]) in err.value.message()
        finally:
            c.close()


# ------------------------------------------------------------------------ v2: JSON
def test_v2_json_tabular_content_type_pd(bundle, table):
    frame = _frame(table, 30, 12)
    frame.loc[3, "depth"] = np.nan  # a missing number: null, imputed as /predict does
    expected = _expected(bundle, frame)
    body = {"id": "42", "parameters": {"content_type": "pd"},
            "inputs": v2_columns(frame.drop(columns=["id"]), shape_1=True)}
    for t in body["inputs"]:
        t["data"] = [None if v != v else v for v in t["data"]]
    flat = {"inputs": v2_columns(frame)}  # shape [n], the id column ignored, no content_type
    for t in flat["inputs"]:
        t["data"] = [None if v != v else v for v in t["data"]]

    async def go(c):
        r = await c.post(f"/v2/models/{NAME}/infer", json=body)
        z = await c.post(f"/v2/models/{NAME}/versions/1/infer", content=gzip.compress(json.dumps(flat).encode()),
                         headers={"content-encoding": "gzip", "content-type": "application/json"})
        return r, z

    r, z = run(create_app(bundle, model_name=NAME), go)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "42" and out["model_name"] == NAME and out["model_version"] == "1"
    assert out["parameters"]["content_type"] == "pd"
    (pred,) = out["outputs"]
    assert pred["name"] == "prediction" and pred["datatype"] == "FP32" and pred["shape"] == [12, 1]
    close(pred["data"], expected)
    assert z.status_code == 200, z.text
    close(z.json()["outputs"][0]["data"], expected)


def _v2_bad_cases(table: pd.DataFrame) -> list[tuple[str, Any, int, str]]:
    good = v2_columns(_frame(table, 0, 3).drop(columns=["id"]))

    def edit(i: int, **kw: Any) -> list[dict[str, Any]]:
        return [dict(t, **kw) if j == i else t for j, t in enumerate(good)]

    carat = next(i for i, t in enumerate(good) if t["name"] == "carat")
    cut = next(i for i, t in enumerate(good) if t["name"] == "cut")
    return [
        ("malformed", b'{"inputs": [', 400, "Malformed JSON"),
        ("empty", b"", 400, "empty"),
        ("not an object", b"[1, 2]", 400, "JSON object"),
        ("no inputs", {"inputs": []}, 400, "non-empty list"),
        ("missing column", {"inputs": [t for t in good if t["name"] != "carat"]}, 422, "carat"),
        ("unknown datatype", {"inputs": edit(carat, datatype="FLOAT")}, 400, "datatype"),
        ("datatype a list", {"inputs": edit(carat, datatype=["FP64"])}, 400, "datatype"),
        ("count mismatch", {"inputs": edit(carat, shape=[4])}, 400, "elements"),
        ("rows mismatch", {"inputs": edit(carat, shape=[2], data=[0.1, 0.2])}, 422, "values"),
        ("text in a number", {"inputs": edit(carat, datatype="BYTES", data=["a", "b", "c"])}, 422, "carat"),
        ("number typed wrong", {"inputs": edit(carat, datatype="FP32", data=["a", "b", "c"])}, 422, "number"),
        ("object category", {"inputs": edit(cut, datatype="BYTES", data=[{"a": 1}] * 3)}, 422, "string"),
        ("matrix column", {"inputs": edit(carat, shape=[3, 2], data=[1.0] * 6)}, 400, "[rows, 1]"),
        ("bad shape", {"inputs": edit(carat, shape="3")}, 400, "shape"),
        ("content type", {"inputs": good, "parameters": {"content_type": "str"}}, 400, "content_type"),
        ("unknown output", {"inputs": good, "outputs": [{"name": "proba"}]}, 400, "proba"),
    ]


def test_v2_bad_requests_get_their_status_and_an_error(bundle, table):
    cases = _v2_bad_cases(table)

    async def go(c):
        out = []
        for name, body, status, words in cases:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = await c.post(f"/v2/models/{NAME}/infer", **kw)
            out.append((name, status, words, r))
        out.append(("unknown model", 404, NAME, await c.post("/v2/models/other/infer", json={"inputs": []})))
        out.append(("unknown version", 404, "version", await c.get(f"/v2/models/{NAME}/versions/7")))
        out.append(("bad header", 400, "Inference-Header-Content-Length", await c.post(
            f"/v2/models/{NAME}/infer", content=b'{"inputs": []}', headers={"inference-header-content-length": "999"})))
        out.append(("gzip bomb", 413, "inflated", await c.post(
            f"/v2/models/{NAME}/infer", content=gzip.compress(b" " * 200_000), headers={"content-encoding": "gzip"})))
        ok = await c.post(f"/v2/models/{NAME}/infer", json={"inputs": cases[-1][1]["inputs"]})
        return out, ok

    out, ok = run(create_app(bundle, model_name=NAME, max_body_bytes=100_000), go)
    for name, status, words, r in out:
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["error"], (name, r.json())
    assert ok.status_code == 200 and len(ok.json()["outputs"][0]["data"]) == 3


def _binary_request(frame: pd.DataFrame, edit: dict[str, tuple[str, bytes]] | None = None) -> tuple[bytes, dict]:
    """A v2 request with every column as a binary tensor (as tritonclient builds it:
    FP32 numbers, INT64 ids, BYTES text), ``edit``: column -> (datatype, raw bytes) to send instead."""
    inputs, raws = [], []
    for name in frame.columns:
        vals = frame[name].to_numpy()
        if vals.dtype.kind == "f":
            dt, raw = "FP32", vals.astype("<f4").tobytes()
        elif vals.dtype.kind in "iu":
            dt, raw = "INT64", vals.astype("<i8").tobytes()
        else:
            dt, raw = "BYTES", b"".join(len(b).to_bytes(4, "little") + b for b in (str(v).encode() for v in vals))
        dt, raw = (edit or {}).get(name, (dt, raw))
        inputs.append({"name": name, "shape": [len(frame), 1], "datatype": dt,
                       "parameters": {"binary_data_size": len(raw)}})
        raws.append(raw)
    head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return head + b"".join(raws), {"inference-header-content-length": str(len(head)),
                                   "content-type": "application/octet-stream"}


def test_v2_binary_tensors_of_one_and_many_rows(bundle, table):
    """Binary tensors as tritonclient sends them, one row and many: the same answers as
    JSON and ``predict_frame``; malformed binary data gets the decoder's precise error."""
    one, many = _frame(table, 0, 1), _frame(table, 1, 40)
    bad = [
        ("truncated text", {"cut": ("BYTES", (9).to_bytes(4, "little") + b"Ideal")}, 400, "malformed BYTES"),
        ("not UTF-8", {"cut": ("BYTES", (2).to_bytes(4, "little") + b"\xff\xfe")}, 422, "UTF-8"),
        ("short number", {"carat": ("FP32", b"\x00\x00")}, 400, "binary_data_size"),
        ("datatype a list", {"carat": (["FP32"], b"\x00\x00\x80?")}, 400, "datatype"),
        ("text in a number", {"carat": ("BYTES", (1).to_bytes(4, "little") + b"a")}, 422, "carat"),
        ("float16", {"carat": ("FP16", np.array([0.5], "<f2").tobytes())}, 200, ""),
    ]

    def answer(r: httpx.Response) -> np.ndarray:
        n = int(r.headers["inference-header-content-length"])
        head = json.loads(r.content[:n])
        assert [o["name"] for o in head["outputs"]] == ["prediction"], head
        return np.frombuffer(r.content[n:], "<f4")

    async def go(c):
        url = f"/v2/models/{NAME}/infer"
        got = {}
        for key, frame in (("one", one), ("many", many)):
            body, headers = _binary_request(frame)
            got[key] = await c.post(url, content=body, headers=headers)
            got[key + "-json"] = await c.post(url, json={"inputs": v2_columns(frame)})
        for name, edit, _, _ in bad:
            body, headers = _binary_request(one, edit)
            got[name] = await c.post(url, content=body, headers=headers)
        return got

    got = run(create_app(bundle, model_name=NAME), go)
    for key, frame in (("one", one), ("many", many)):
        assert got[key].status_code == 200, got[key].text
        binary = answer(got[key])
        close(binary, _expected(bundle, frame.astype({c: np.float32 for c in frame.columns
                                                       if frame[c].dtype.kind == "f"})))
        close(binary, np.asarray(got[key + "-json"].json()["outputs"][0]["data"], dtype=np.float64))
    for name, _, status, words in bad:
        r = got[name]
        assert r.status_code == status, (name, r.status_code, r.text)
        if status != 200:
            assert words in r.json()["error"], (name, r.json())


def test_v2_binary_requests_sharing_one_header_each_get_their_own_answer(bundle, table):
    """Single rows whose text has the same lengths make byte-equal binary request headers
    (the endpoint reads such a header once): each still gets its own row's prediction;
    the same header with data that does not fit it gets the decoder's error, and the next
    good request is answered; JSON and binary inputs mixed in one request are answered too."""
    rows = _frame(table, 0, 400)
    lengths = rows[["cut", "color", "clarity"]].astype(str).map(len)
    same = rows[(lengths == lengths.iloc[0]).all(axis=1)].iloc[:12].reset_index(drop=True)
    requests = [_binary_request(same.iloc[[i]]) for i in range(len(same))]
    heads = {body[: int(h["inference-header-content-length"])] for body, h in requests}
    assert len(same) >= 6 and len(heads) == 1  # the premise: one header, different values
    assert same.drop_duplicates().shape[0] == len(same)
    body, headers = requests[0]
    n = int(headers["inference-header-content-length"])
    short = body[:-2]  # the same header; the last input's data two bytes short
    binary_names = [c for c in DIAMONDS_NUMERIC if c != "carat"]  # the rest as JSON data
    mixed = [m for m in v2_columns(same.iloc[[0]]) if m["name"] not in binary_names]
    mixed += [{"name": c, "shape": [1, 1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}
              for c in binary_names]
    mixed_raw = b"".join(np.asarray(same[c].iloc[:1], "<f4").tobytes() for c in binary_names)
    mixed_head = json.dumps({"inputs": mixed}).encode()

    async def go(c):
        url = f"/v2/models/{NAME}/infer"
        got = [await c.post(url, content=b, headers=h) for b, h in requests]
        bad = await c.post(url, content=short, headers=headers)
        again = await c.post(url, content=requests[1][0], headers=requests[1][1])
        mix = await c.post(url, content=mixed_head + mixed_raw,
                           headers={"inference-header-content-length": str(len(mixed_head))})
        ids = []  # one answer header each: no id, "id": null, "id": "a" (the id is echoed as sent)
        for rid in ({}, {"id": None}, {"id": "a"}, {}):
            head = json.dumps({**rid, "inputs": json.loads(body[:n])["inputs"],
                               "parameters": {"binary_data_output": True}}).encode()
            r = await c.post(url, content=head + body[n:], headers={"inference-header-content-length": str(len(head))})
            ids.append(json.loads(r.content[: int(r.headers["inference-header-content-length"])]))
        return got, bad, again, mix, ids

    got, bad, again, mix, ids = run(create_app(bundle, model_name=NAME), go)
    assert ["id" in h for h in ids] == [False, True, True, False] and ids[1]["id"] is None and ids[2]["id"] == "a"
    as32 = same.astype({c: np.float32 for c in same.columns if same[c].dtype.kind == "f"})
    expected = _expected(bundle, as32)
    answers = []
    for r in got:
        assert r.status_code == 200, r.text
        k = int(r.headers["inference-header-content-length"])
        answers.append(np.frombuffer(r.content[k:], "<f4")[0])
    close(np.array(answers), expected)
    assert len(set(answers)) > 1
    assert bad.status_code == 400 and "binary_data_size" in bad.json()["error"], bad.text
    assert again.status_code == 200
    k = int(again.headers["inference-header-content-length"])
    close(np.frombuffer(again.content[k:], "<f4"), expected[1:2])
    assert mix.status_code == 200, mix.text
    close(mix.json()["outputs"][0]["data"], expected[:1])


def test_v2_health_and_metadata_before_and_after_loading(bundle_url, tmp_path):
    bad = tmp_path / "broken.bundle"
    bad.write_bytes(b"not a bundle")

    async def failed():
        app = create_app(str(bad))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                for _ in range(200):
                    if (await c.get("/health")).json()["status"] != "loading":
                        break
                    await asyncio.sleep(0.05)
                return [await c.get(p) for p in ("/v2/health/live", "/v2/health/ready", "/v2/models/broken/ready",
                                                 "/v2/models/broken", "/v1/models/broken", "/ping")]

    live, ready, mready, meta, tf, ping = asyncio.run(failed())
    assert live.status_code == 200 and ready.status_code == 503 and mready.status_code == 503
    assert "BundleError" in ready.json()["error"] and meta.status_code == 503
    assert tf.status_code == 200 and tf.json()["model_version_status"][0]["state"] == "END"
    assert ping.status_code == 503

    async def good(c):
        return [await c.get(p) for p in ("/v2", "/v2/health/ready", f"/v2/models/{NAME}", f"/v2/models/{NAME}/ready")]

    server, ready, meta, mready = run(create_app(bundle_url), good)  # the name: the file's, without .bundle
    assert server.json()["extensions"] == ["binary_tensor_data"] and ready.status_code == 200
    m = meta.json()
    assert m["name"] == NAME and m["versions"] == ["1"]
    types = {i["name"]: i["datatype"] for i in m["inputs"]}
    assert types["carat"] == "FP64" and types["cut"] == "BYTES" and "price" not in types
    assert m["parameters"]["features"]["shape"][1] == len(m["parameters"]["features"]["feature_names"])
    assert mready.json() == {"name": NAME, "ready": True}


# --------------------------------------------------------------------- TF Serving
def test_tfserving_rows_columns_and_features(bundle, table):
    frame = _frame(table, 100, 8)
    expected = _expected(bundle, frame)
    records = frame.to_dict("records")
    X, _ = bundle.preprocessor.transform(frame, with_target=False)

    async def go(c):
        status = await c.get(f"/v1/models/{NAME}")
        meta = (await c.get(f"/v1/models/{NAME}/metadata")).json()
        order = meta["metadata"]["signature_def"]["instance_order"]
        lists = [[r[k] for k in order] for r in records]
        return status, meta, [
            await c.post(f"/v1/models/{NAME}:predict", json={"instances": records}),
            await c.post(f"/v1/models/{NAME}/versions/1:predict", json={"signature_name": "serving_default",
                                                                        "instances": lists}),
            await c.post(f"/v1/models/{NAME}:predict", json={"inputs": {k: frame[k].tolist() for k in frame}}),
            await c.post(f"/v1/models/{NAME}:predict", json={"signature_name": "features", "instances": X.tolist()}),
            await c.post(f"/v1/models/{NAME}:predict", json={"signature_name": "features", "inputs": {"features": X.tolist()}}),
        ]

    status, meta, (rows, lists, cols, feats, feats_cols) = run(create_app(bundle, model_name=NAME), go)
    assert status.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    sig = meta["metadata"]["signature_def"]["signature_def"]
    assert sig["serving_default"]["inputs"]["carat"]["dtype"] == "DT_DOUBLE"
    assert sig["serving_default"]["outputs"]["prediction"]["dtype"] == "DT_FLOAT"
    for r in (rows, lists, feats):
        assert r.status_code == 200, r.text
    close(rows.json()["predictions"], expected)
    close(lists.json()["predictions"], expected)
    close(cols.json()["outputs"], expected)
    close(feats.json()["predictions"], bundle.predict_array(X).ravel())
    close(feats_cols.json()["outputs"], bundle.predict_array(X).ravel())


def test_tfserving_errors_are_error_objects(bundle, table):
    rec = _frame(table, 0, 2).to_dict("records")

    async def go(c):
        p = f"/v1/models/{NAME}:predict"
        return [
            (400, "instances", await c.post(p, json={"rows": rec})),
            (400, "instances", await c.post(p, json={"instances": rec, "inputs": {}})),
            (422, "carat", await c.post(p, json={"instances": [{k: v for k, v in r.items() if k != "carat"} for r in rec]})),
            (422, "values", await c.post(p, json={"instances": [[1.0, 2.0]]})),
            (422, "depth", await c.post(p, json={"instances": [{**rec[0], "depth": "deep"}]})),
            (400, "signature_name", await c.post(p, json={"signature_name": "x", "instances": rec})),
            (422, "features", await c.post(p, json={"signature_name": "features", "instances": [[1.0, 2.0]]})),
            (404, NAME, await c.post("/v1/models/other:predict", json={"instances": rec})),
            (404, NAME, await c.get("/v1/models/other")),
            (400, "Malformed", await c.post(p, content=b"{")),
        ]

    for status, words, r in run(create_app(bundle, model_name=NAME), go):
        assert r.status_code == status, (words, r.status_code, r.text)
        assert words in r.json()["error"], r.json()


# ------------------------------------------------------------------------- MLflow
def test_mlflow_every_input_format(bundle, table):
    frame = _frame(table, 200, 9)
    expected = _expected(bundle, frame)
    split = frame.to_dict("split")
    split.pop("index")

    async def go(c):
        inv = "/invocations"
        return (await c.get("/ping")), (await c.get("/version")), [
            await c.post(inv, json={"dataframe_split": split}),
            await c.post(inv, json={"dataframe_split": frame.to_dict("split")}),  # with an index: ignored
            await c.post(inv, json={"dataframe_records": frame.to_dict("records"), "params": {}}),
            await c.post(inv, json={"instances": frame.to_dict("records")}),
            await c.post(inv, json={"inputs": frame.to_dict("list")}),
            await c.post(inv, content=frame.to_csv(index=False), headers={"content-type": "text/csv"}),
        ]

    ping, version, answers = run(create_app(bundle), go)
    assert ping.status_code == 200 and version.text == daskml_scale.__version__
    for a in answers:
        assert a.status_code == 200, a.text
        preds = a.json()["predictions"]
        assert set(preds[0]) == {"prediction"}
        close([p["prediction"] for p in preds], expected)


def test_mlflow_errors_carry_error_code_and_message(bundle, table):
    rec = _frame(table, 0, 2).to_dict("records")

    async def go(c):
        inv = "/invocations"
        return [
            (400, "exactly one", await c.post(inv, json={"dataframe_records": rec, "instances": rec})),
            (400, "exactly one", await c.post(inv, json={"records": rec})),
            (422, "carat", await c.post(inv, json={"dataframe_split": {"columns": ["cut"], "data": [["Ideal"]]}})),
            (422, "values", await c.post(inv, json={"dataframe_split": {"columns": ["cut", "carat"], "data": [["Ideal"]]}})),
            (415, "xml", await c.post(inv, content=b"<x/>", headers={"content-type": "application/xml"})),
            (422, "carat", await c.post(inv, content=b"cut\nIdeal\n", headers={"content-type": "text/csv"})),
        ]

    for status, words, r in run(create_app(bundle), go):
        assert r.status_code == status, (words, r.status_code, r.text)
        body = r.json()
        assert words in body["message"] and body["error"] == body["message"]
        assert body["error_code"] == "BAD_REQUEST"


# ------------------------------------------------------------- shared micro-batches
def _odd_requests(rec: dict[str, Any]) -> list[tuple[str, Any]]:
    """Each protocol's request with one field replaced by a JSON value of another kind."""
    cols = list(rec)
    good_v2 = v2_columns(pd.DataFrame([rec]))
    out: list[tuple[str, Any]] = []
    v2 = f"/v2/models/{NAME}/infer"
    tfs = f"/v1/models/{NAME}:predict"
    for w in ([1], {"a": 1}, None, 1.5, "x", True, [], {}):
        for field in ("name", "datatype", "shape", "data", "parameters"):
            out.append((v2, {"inputs": [dict(good_v2[0], **{field: w}), *good_v2[1:]]}))
        for field in ("parameters", "outputs", "id", "inputs"):
            out.append((v2, {"inputs": good_v2, field: w}))
        out += [(v2, {"inputs": good_v2, "parameters": {"content_type": w}}),
                (v2, {"inputs": good_v2, "outputs": [{"name": w}]}),
                (v2, {"inputs": good_v2, "outputs": [{"name": "prediction", "parameters": w}]}),
                (tfs, {"instances": [rec], "signature_name": w}), (tfs, {"instances": w}), (tfs, {"inputs": w}),
                (tfs, {"instances": [w]}), (tfs, {"inputs": {c: w for c in cols}}),
                (tfs, {"instances": [{**rec, cols[0]: w}]}),
                ("/invocations", {"dataframe_split": {"columns": [w, *cols[1:]], "data": [list(rec.values())]}}),
                ("/invocations", {"dataframe_split": {"columns": cols, "data": w}}),
                ("/invocations", {"dataframe_split": w}), ("/invocations", {"dataframe_records": [w]}),
                ("/invocations", {"dataframe_records": w}), ("/invocations", {"instances": w}),
                ("/invocations", {"inputs": w}), ("/invocations", {"inputs": {c: w for c in cols}}),
                ("/invocations", {"params": w, "dataframe_records": [rec]}),
                ("/predict", [w]), ("/predict", [{**rec, cols[0]: w}]), ("/predict", {"records": w})]
    return out


def test_a_json_value_of_any_kind_in_any_field_is_answered_not_a_server_error(bundle, table):
    """A client's mistake is the client's: a list, an object, null, a number, a string or a
    boolean where a protocol expects something else gets an answer (2xx or 4xx with an
    error), never a 500 (a JSON list or object as a dict key once raised TypeError)."""
    rec = _frame(table, 0, 1).iloc[0].to_dict()
    cases = _odd_requests(rec)

    async def go(c):
        return [(path, body, await c.post(path, json=body)) for path, body in cases]

    answers = run(create_app(bundle, model_name=NAME), go)
    assert len(answers) > 200
    server_errors = [(p, json.dumps(b)[:120], r.status_code) for p, b, r in answers if r.status_code >= 500]
    assert not server_errors, server_errors
    for p, b, r in answers:
        if r.status_code >= 400:
            assert r.json().get("error"), (p, b, r.text)


def test_requests_of_every_dialect_share_batches(bundle, table):
    frame = _frame(table, 300, 40)
    expected = _expected(bundle, frame)
    recs = frame.to_dict("records")

    def call(c, i: int):
        one = frame.iloc[[i]]
        kind = i % 4
        if kind == 0:
            return c.post("/predict", json=[recs[i]])
        if kind == 1:
            return c.post(f"/v2/models/{NAME}/infer", json={"inputs": v2_columns(one)})
        if kind == 2:
            return c.post(f"/v1/models/{NAME}:predict", json={"instances": [recs[i]]})
        return c.post("/invocations", json={"dataframe_split": {"columns": list(one.columns), "data": one.values.tolist()}})

    def value(r, i: int) -> float:
        j = r.json()
        return [lambda: j[0]["prediction"], lambda: j["outputs"][0]["data"][0], lambda: j["predictions"][0],
                lambda: j["predictions"][0]["prediction"]][i % 4]()

    async def go(c):
        m0 = (await c.get("/metrics")).text
        answers = await asyncio.gather(*[call(c, i) for i in range(len(recs))])
        return m0, answers, (await c.get("/metrics")).text

    m0, answers, m1 = run(create_app(bundle, model_name=NAME, max_wait_ms=50), go)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:2]
    close([value(a, i) for i, a in enumerate(answers)], expected)

    def metric(text: str, name: str) -> float:
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))

    calls = metric(m1, "daskml_scale_batch_rows_count") - metric(m0, "daskml_scale_batch_rows_count")
    assert calls < len(recs) / 4, f"{len(recs)} concurrent requests of 4 dialects made {calls} model calls"
    for endpoint in ("/predict", "/v2/models/{name}/infer", "/v1/models/{name}:predict", "/invocations"):
        assert f'endpoint="{endpoint}",method="POST",status="200"' in m1, endpoint


def test_openapi_describes_every_protocol(bundle):
    async def go(c):
        return (await c.get("/openapi.json")).json()

    paths = run(create_app(bundle), go)["paths"]
    for p in ("/predict", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
              "/v2/models/{name}/infer", "/v1/models/{name}", "/v1/models/{name}/metadata", "/v1/models/{name}:predict",
              "/ping", "/version", "/invocations"):
        assert p in paths, p
    assert "application/octet-stream" in paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]


def test_classification_labels_over_v2_and_mlflow(tmp_path, table):
    import keras

    pre = daskml_scale.Preprocessor(target="cut", numeric=["carat", "depth"], categorical=["color"]).fit(table)
    X, _ = pre.transform(table)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(len(pre.classes_), activation="softmax")])
    b = load_bundle(save_bundle(model, pre, str(tmp_path / "cut.bundle")))
    frame = table[["carat", "depth", "color"]].iloc[:6].reset_index(drop=True)
    expected = b.predict_frame(frame)

    async def go(c):
        return (await c.post("/v2/models/cut/infer", json={"inputs": v2_columns(frame)}),  # the name of the file it was loaded from
                await c.post("/invocations", json={"dataframe_records": frame.to_dict("records")}))

    v2, ml = run(create_app(b), go)
    assert v2.status_code == 200, v2.text
    outs = {o["name"]: o for o in v2.json()["outputs"]}
    assert list(outs) == b.output_names and outs["label"]["datatype"] == "BYTES"
    assert outs["label"]["data"] == expected["label"].tolist()
    p0 = b.output_names[0]
    close(outs[p0]["data"], expected[p0].to_numpy())
    assert [p["label"] for p in ml.json()["predictions"]] == expected["label"].tolist()


def drop_shallow(df: pd.DataFrame) -> pd.DataFrame:
    """A transform that drops rows: those without a depth."""
    return df.dropna(subset=["depth"])


@pytest.mark.parametrize("on_dropped", ["keep", "omit"])
def test_rows_the_transform_drops_on_every_protocol(tmp_path, table, on_dropped):
    import keras

    pre = daskml_scale.Preprocessor(target="price", numeric=["carat", "depth", "x"], categorical=["cut"],
                                    transform=drop_shallow).fit(table)
    X, _ = pre.transform(table)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(1)])
    b = load_bundle(save_bundle(model, pre, str(tmp_path / "shallow.bundle")))
    frame = table[["carat", "depth", "cut", "x"]].iloc[:5].reset_index(drop=True)
    frame.loc[[1, 3], "depth"] = None
    kept = b.predict_frame(frame.drop(index=[1, 3]))["prediction"].to_numpy()
    recs = [{k: (None if v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]
    cols = {k: [r[k] for r in recs] for k in frame.columns}

    async def go(c):
        return (await c.post("/v2/models/shallow/infer", json={"inputs": [
                    {"name": k, "datatype": "BYTES" if k == "cut" else "FP64", "shape": [5], "data": v}
                    for k, v in cols.items()]}),
                await c.post("/v1/models/shallow:predict", json={"instances": recs}),
                await c.post("/invocations", json={"dataframe_records": recs}))

    v2, tf, ml = run(create_app(str(tmp_path / "shallow.bundle"), on_dropped=on_dropped), go)
    for r in (v2, tf, ml):
        assert r.status_code == 200, r.text
    outs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    preds = tf.json()["predictions"]
    if on_dropped == "omit":
        assert list(outs) == ["prediction"]
        close(outs["prediction"], kept)
        close(preds, kept)
        close([p["prediction"] for p in ml.json()["predictions"]], kept)
        return
    assert outs["dropped"] == [False, True, False, True, False]
    assert outs["prediction"][1] is None and outs["prediction"][3] is None
    close([outs["prediction"][i] for i in (0, 2, 4)], kept)
    assert preds[1] == {"prediction": None, "dropped": True}
    close([preds[i] for i in (0, 2, 4)], kept)
    ml_preds = ml.json()["predictions"]
    assert ml_preds[3]["dropped"] is True and ml_preds[3]["prediction"] is None and ml_preds[3]["reason"]
