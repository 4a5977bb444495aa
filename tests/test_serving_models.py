"""Several models in one server, routed by name on every protocol; a new version
swapped in while requests are in flight; a version that fails to load."""

from __future__ import annotations

import asyncio
import re
import shutil
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.bundle import load_bundle, save_bundle
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform
from daskml_scale.serving import create_app

from .test_serving_protocols import close, run, v2_columns


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return diamonds().iloc[:1500]


def _price_bundle(table: pd.DataFrame, path: str, seed: int) -> str:
    import keras

    pre = daskml_scale.Preprocessor(
        target="log_price", numeric=[*DIAMONDS_NUMERIC, "volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=diamonds_transform,
    ).fit(table)
    X, _ = pre.transform(table)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    return save_bundle(model, pre, path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, table) -> dict[str, Any]:
    """A folder of two bundles (price: regression, cut: classification) and a second
    version of price elsewhere."""
    import keras

    d = tmp_path_factory.mktemp("models")
    price = _price_bundle(table, str(d / "price.bundle"), 0)
    pre = daskml_scale.Preprocessor(target="cut", numeric=["carat", "depth"], categorical=["color"]).fit(table)
    X, _ = pre.transform(table)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(len(pre.classes_), activation="softmax")])
    cut = save_bundle(model, pre, str(d / "cut.bundle"))
    other = tmp_path_factory.mktemp("v2")
    price2 = _price_bundle(table, str(other / "price.bundle"), 1)
    broken = other / "broken.bundle"
    broken.write_bytes(b"not a bundle")
    return {"dir": str(d), "price": price, "cut": cut, "price2": price2, "broken": str(broken)}


def _frame(table: pd.DataFrame, n: int = 6) -> pd.DataFrame:
    return table.drop(columns=["price"]).iloc[:n].reset_index(drop=True)


def test_a_folder_of_bundles_routes_by_name_on_every_protocol(folder, table):
    frame = _frame(table)
    price, cut = load_bundle(folder["price"]), load_bundle(folder["cut"])
    exp_price = price.predict_frame(frame)["prediction"].to_numpy()
    exp_cut = cut.predict_frame(frame)["label"].tolist()
    recs = frame.to_dict("records")

    async def go(c):
        return {
            "models": await c.get("/models"),
            "default": await c.post("/predict", json=recs),
            "price": await c.post("/models/price/predict", json=recs),
            "cut": await c.post("/models/cut/predict", json=recs),
            "cut_v2": await c.post("/v2/models/cut/infer", json={"inputs": v2_columns(frame)}),
            "price_tf": await c.post("/v1/models/price:predict", json={"instances": recs}),
            "cut_info": await c.get("/models/cut/info"),
            "cut_metrics": await c.get("/models/cut/metrics"),
            "price_metrics": await c.get("/models/price/metrics"),
            "unknown": await c.post("/models/nope/predict", json=recs),
            "unknown_v2": await c.get("/v2/models/nope"),
            "unknown_info": await c.get("/models/nope/info"),
            "ready": await c.get("/v2/health/ready"),
            # the same paths again, interleaved: now answered from the kept route matches
            "again": [await c.post(path, json=recs) for path in ("/models/price/predict", "/models/cut/predict",
                                                                 "/models/nope/predict", "/models/price/predict")],
            "again_v2": [await c.post(f"/v2/models/{name}/infer", json={"inputs": v2_columns(frame)})
                         for name in ("price", "cut", "nope", "cut")],
        }

    r = run(create_app(folder["dir"]), go)  # sorted file names: cut is the first, the default
    listed = r["models"].json()
    assert listed["default"] == "cut" and {m["name"] for m in listed["models"]} == {"cut", "price"}
    assert all(m["state"] == "READY" and m["version"] == "1" for m in listed["models"])
    assert [o["label"] for o in r["default"].json()] == exp_cut
    close([o["prediction"] for o in r["price"].json()], exp_price)
    assert [o["label"] for o in r["cut"].json()] == exp_cut
    outs = {o["name"]: o["data"] for o in r["cut_v2"].json()["outputs"]}
    assert outs["label"] == exp_cut
    close(r["price_tf"].json()["predictions"], exp_price)
    assert r["cut_info"].json()["task"] == "classification"
    for k in ("unknown", "unknown_v2", "unknown_info"):
        assert r[k].status_code == 404 and "['cut', 'price']" in r[k].json()["error"], k

    def count(text: str, endpoint: str) -> float:
        m = re.search(rf'^daskml_scale_requests_total{{endpoint="{re.escape(endpoint)}",method="POST",status="200"}} (\S+)$',
                      text, re.M)
        return float(m.group(1)) if m else 0.0

    assert count(r["cut_metrics"].text, "/models/{name}/predict") == 1
    assert count(r["price_metrics"].text, "/models/{name}/predict") == 1
    assert count(r["price_metrics"].text, "/v1/models/{name}:predict") == 1
    assert count(r["cut_metrics"].text, "/v1/models/{name}:predict") == 0
    assert r["ready"].status_code == 200
    price1, cut1, nope, price2 = r["again"]
    close([o["prediction"] for o in price1.json()], exp_price)
    close([o["prediction"] for o in price2.json()], exp_price)
    assert [o["label"] for o in cut1.json()] == exp_cut and nope.status_code == 404
    v2_price, v2_cut, v2_nope, v2_cut2 = r["again_v2"]
    close({o["name"]: o["data"] for o in v2_price.json()["outputs"]}["prediction"], exp_price)
    for a in (v2_cut, v2_cut2):
        assert {o["name"]: o["data"] for o in a.json()["outputs"]}["label"] == exp_cut
    assert v2_nope.status_code == 404 and v2_nope.json()["error"]


def test_a_new_version_is_swapped_in_without_failing_a_request_in_flight(folder, table):
    frame = _frame(table, 20)
    recs = frame.to_dict("records")
    v1 = load_bundle(folder["price"]).predict_frame(frame)["prediction"].to_numpy()
    v2 = load_bundle(folder["price2"]).predict_frame(frame)["prediction"].to_numpy()
    assert not np.allclose(v1, v2, atol=1e-3)  # the two versions answer differently

    app = create_app({"price": folder["price"]})
    phase = {"loaded": False}

    async def go(c):
        answers: list[tuple[int, bool, httpx.Response]] = []  # (row, sent after the load answered, answer)
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                sent_after = phase["loaded"]
                answers.append((i, sent_after, await c.post("/v1/models/price:predict", json={"instances": [recs[i]]})))

        old = app.state.models.served["price"].state
        clients = [asyncio.ensure_future(client(i)) for i in range(len(recs))]
        await asyncio.sleep(0.3)
        load = await c.post("/v2/repository/models/price/load", json={"parameters": {"url": folder["price2"]}})
        phase["loaded"] = True
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
        for _ in range(500):  # the old version stops once idle
            if old.batcher._task is None:  # noqa: SLF001
                break
            await asyncio.sleep(0.01)
        old_stopped = old.batcher._task is None  # noqa: SLF001
        failed = await c.post("/v2/repository/models/price/load", json={"parameters": {"url": folder["broken"]}})
        still = await c.post("/v1/models/price:predict", json={"instances": recs})
        meta = await c.get("/v2/models/price")
        listed = await c.get("/models")
        return answers, load, old_stopped, failed, still, meta, listed

    answers, load, old_stopped, failed, still, meta, listed = run(app, go)
    assert load.status_code == 200 and load.json()["version"] == "2", load.text
    assert all(a.status_code == 200 for _, _, a in answers), [a.text for _, _, a in answers if a.status_code != 200][:3]
    before = [(i, a.json()["predictions"][0]) for i, after, a in answers if not after]
    after = [(i, a.json()["predictions"][0]) for i, after, a in answers if after]
    assert len(before) > len(recs) and len(after) >= len(recs), (len(before), len(after))
    # before the swap: one version's answer or the other's (the swap happens while they fly); after: the new one
    for i, g in before:
        assert np.isclose(g, v1[i], atol=1e-5) or np.isclose(g, v2[i], atol=1e-5), (i, g, v1[i], v2[i])
    assert any(np.isclose(g, v1[i], atol=1e-5) for i, g in before)
    for i, g in after:
        assert np.isclose(g, v2[i], atol=1e-5), (i, g, v2[i])
    assert old_stopped
    assert failed.status_code == 422 and "failed to load" in failed.json()["error"]
    close(still.json()["predictions"], v2)  # the failed version changed nothing
    assert meta.json()["versions"] == ["2"]
    (m,) = listed.json()["models"]
    assert m["version"] == "2" and "BundleError" in m["reason"] and m["state"] == "READY"


def test_load_adds_a_model_and_unload_removes_it(folder, table, tmp_path):
    frame = _frame(table)
    exp = load_bundle(folder["cut"]).predict_frame(frame)["label"].tolist()
    path = tmp_path / "price.bundle"
    shutil.copy(folder["price"], path)

    async def go(c):
        added = await c.post("/v2/repository/models/cut/load", json={"parameters": {"url": folder["cut"]}})
        pred = await c.post("/models/cut/predict", json=frame.to_dict("records"))
        index = await c.post("/v2/repository/index")
        no_url = await c.post("/v2/repository/models/nope/load")
        default = await c.post("/v2/repository/models/price/unload")
        gone = await c.post("/v2/repository/models/cut/unload")
        after = await c.post("/models/cut/predict", json=frame.to_dict("records"))
        shutil.copy(folder["price2"], path)  # a new file at the same URL: load reads it again
        again = await c.post("/v2/repository/models/price/load")
        return added, pred, index, no_url, default, gone, after, again

    added, pred, index, no_url, default, gone, after, again = run(create_app(str(path)), go)
    assert added.status_code == 200 and added.json()["version"] == "1"
    assert [o["label"] for o in pred.json()] == exp
    assert {m["name"] for m in index.json()} == {"price", "cut"}
    assert no_url.status_code == 404 and "URL" in no_url.json()["error"]
    assert default.status_code == 400 and gone.status_code == 200 and after.status_code == 404
    assert again.status_code == 200 and again.json()["version"] == "2"
    assert again.json()["content_hash"] == load_bundle(folder["price2"]).content_hash


def test_tritonclient_reloads_through_the_repository_endpoint(folder, table, tmp_path):
    """``InferenceServerClient.load_model`` (the body ``{}``: the model's own URL) swaps the
    new file in; a broken file leaves the old version answering, and the index says why."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    from .test_serving_protocols import real_server

    path = tmp_path / "price.bundle"
    shutil.copy(folder["price"], path)
    frame = _frame(table)
    exp2 = load_bundle(folder["price2"]).predict_frame(frame)["prediction"].to_numpy()
    with real_server(create_app(str(path))) as base:
        c = triton.InferenceServerClient(base)
        shutil.copy(folder["price2"], path)
        c.load_model("price")
        shutil.copy(folder["broken"], path)
        with pytest.raises(InferenceServerException, match="failed to load"):
            c.load_model("price")
        index = c.get_model_repository_index()
        after = httpx.post(f"http://{base}/predict", json=frame.to_dict("records"), timeout=30)
    (entry,) = index
    assert entry["version"] == "2" and entry["state"] == "READY"
    assert "not a daskml_scale bundle" in entry["reason"]  # the failed load is reported
    assert after.status_code == 200
    close([r["prediction"] for r in after.json()], exp2)  # version 2 still answers


def test_the_serve_help_tells_how_to_serve_several_models_and_reload(capsys):
    from daskml_scale import cli

    code = cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    assert code == 0
    for words in ("NAME=URL", "a folder", "SIGHUP", "/v2/repository/models/NAME/load", "old one serving"):
        assert words in text, words
