"""The daskml page of the Dask dashboard (daskml_scale.dashboard): its data endpoint after
a fit on the shared cluster, a fit driven by the CLI from another process, and the page
opened in headless Chromium while a fit runs (slow; skipped without Chromium)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dask.dataframe as dd
import httpx
import numpy as np
import pandas as pd
import pytest

import daskml_scale
import daskml_scale.dashboard
from daskml_scale.dashboard import dashboard_url, fit_state
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform, write_csv_shards

NUMERIC = DIAMONDS_NUMERIC + ["volume"]


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return diamonds().sample(n=2000, random_state=5).reset_index(drop=True)


def mlp(n_features: int):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss="mse", metrics=["mae"])
    return model


def data_json(client, fit: str | None = None) -> dict:
    url = dashboard_url(client)
    assert url, "the test cluster has a dashboard"
    r = httpx.get(url + "/data.json", params={"fit": fit} if fit else None, timeout=30)
    r.raise_for_status()
    return r.json()


def wait_for(predicate, timeout: float = 60.0, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fit_small(client, rows, *, epochs: int, callbacks=(), strategy=None):
    pre = daskml_scale.Preprocessor(target="log_price", numeric=NUMERIC, categorical=DIAMONDS_CATEGORICAL,
                                    transform=diamonds_transform).fit(rows)
    return daskml_scale.fit(mlp(pre.n_features_), dd.from_pandas(rows, npartitions=4), preprocessor=pre,
                            epochs=epochs, validation_fraction=0.2, verbose=0, client=client,
                            callbacks=list(callbacks), strategy=strategy or daskml_scale.ModelAveraging(sync_every=2))


def test_data_endpoint_has_the_fits_epochs_and_workers(client, rows):
    history = fit_small(client, rows, epochs=2)
    # events are sent without waiting: the last one lands shortly after fit() returns
    payload = wait_for(lambda: (p := data_json(client))["fit"]["status"] == "finished" and p, what="the end event")
    fit = payload["fit"]
    assert fit["epoch"] == 2 and fit["epochs"] == 2
    for k, v in history.history.items():
        np.testing.assert_allclose(fit["history"][k], v, rtol=1e-6)
    assert fit["info"]["strategy"] == "averaging" and fit["info"]["train_rows"] == history.daskml_summary["train_rows"]
    rates = fit["rates"][-1]
    assert set(rates["workers"]) == set(client.nthreads())
    total = sum(w["rows_per_s"] for w in rates["workers"].values()) * rates["seconds"]
    assert total == pytest.approx(history.daskml_summary["train_rows"], rel=1e-6)
    steps = [w["steps_per_s"] * 256 for w in rates["workers"].values()]
    np.testing.assert_allclose(steps, [w["rows_per_s"] for w in rates["workers"].values()], rtol=1e-6)
    assert fit["round"] == fit["rounds"] >= 2  # sync_every=2: several rounds an epoch, the last reported
    assert fit["fit"] in [f["fit"] for f in payload["fits"]]
    # the page itself
    page = httpx.get(dashboard_url(client), timeout=30)
    assert page.status_code == 200 and "daskml_scale.fit" in page.text and "data.json" in page.text


def test_parameter_server_traffic_is_reported(client, rows):
    history = fit_small(client, rows, epochs=1, strategy=daskml_scale.ParameterServer("sync", push_every=2))
    fit = wait_for(lambda: (p := data_json(client))["fit"]["status"] == "finished" and p["fit"], what="the fit")
    traffic = fit["rates"][-1]["traffic"]
    assert traffic["pushes_per_s"] * fit["rates"][-1]["seconds"] == pytest.approx(history.history["ps_applied"][-1])
    assert history.history["ps_applied"][-1] > 0


def test_fit_state_from_events():
    events = [
        (1.0, {"fit": "f", "kind": "start", "epochs": 3, "rounds": 2, "fit_info": {"strategy": "x"}, "workers": ["a"]}),
        (2.0, {"fit": "f", "kind": "epoch_begin", "epoch": 0}),
        (2.5, {"fit": "f", "kind": "round", "epoch": 0, "round": 1, "loss": 3.0}),
        (3.0, {"fit": "f", "kind": "epoch", "epoch": 0, "logs": {"loss": 2.0, "val_loss": None}, "seconds": 1.0,
               "rows_per_s": 10.0, "workers": {"a": {"rows_per_s": 10.0}}, "traffic": {}}),
    ]
    s = fit_state(events)
    assert (s["status"], s["epoch"], s["round"], s["round_loss"]) == ("running", 1, 1, 3.0)
    assert s["history"] == {"loss": [2.0], "val_loss": [None]} and s["updated"] == 3.0
    assert fit_state(events + [(4.0, {"fit": "f", "kind": "end", "status": "finished"})])["status"] == "finished"


MODEL_DEF = textwrap.dedent(
    """
    import keras

    def build_model(n_features):
        model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse", metrics=["mae"])
        return model
    """
)


@pytest.mark.slow
def test_a_cli_fit_from_another_process_shows(client, rows, tmp_path):
    write_csv_shards(rows, str(tmp_path / "data"), 2)
    (tmp_path / "model_def.py").write_text(MODEL_DEF)
    # the page comes with the first fit on a scheduler (the fit registers it): maybe this one
    page = httpx.get(dashboard_url(client) + "/data.json", timeout=30)
    before = {f["fit"] for f in page.json()["fits"]} if page.status_code == 200 else set()
    cmd = [sys.executable, "-m", "daskml_scale", "train", "--scheduler", client.scheduler.address,
           "--data", str(tmp_path / "data" / "*.csv"), "--target", "log_price",
           "--transform", "daskml_scale.datasets:diamonds_transform", "--numeric", *NUMERIC,
           "--model", f"{tmp_path / 'model_def.py'}:build_model", "--epochs", "2", "--out", str(tmp_path / "m.bundle"),
           "--validation-fraction", "0.2", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    new = wait_for(lambda: [f for f in data_json(client)["fits"] if f["fit"] not in before and f["status"] == "finished"],
                   what="the CLI's fit")
    fit = data_json(client, new[0]["fit"])["fit"]
    assert fit["epoch"] == 2 and len(fit["history"]["val_loss"]) == 2
    summary = daskml_scale.load_bundle(str(tmp_path / "m.bundle")).metadata["training_summary"]
    np.testing.assert_allclose(fit["history"]["loss"], summary["history"]["loss"], rtol=1e-6)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def headless(browser: str, url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
         "--virtual-time-budget=4000", *args, url],
        capture_output=True, timeout=timeout,
    )


class SlowEpochs(daskml_scale.LivePlot):
    """Record like LivePlot and give each epoch a second more, so the page sees a fit in flight."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        time.sleep(1.0)


@pytest.mark.slow
def test_dashboard_page_in_headless_chromium(client, rows, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium: apt-get install chromium (Debian) to run the screenshot test")
    epochs = 6
    box: dict = {}
    thread = threading.Thread(
        target=lambda: box.setdefault("history", fit_small(client, rows, epochs=epochs,
                                                           callbacks=[SlowEpochs(display="none")])),
        daemon=True,
    )
    thread.start()
    try:
        # the page's own data endpoint: a running fit with at least 3 epochs so far
        def running():
            fit = data_json(client)["fit"]
            return fit if fit and fit["status"] == "running" and fit["epoch"] >= 3 and fit["fit"] not in seen else None

        daskml_scale.dashboard.ensure_dashboard(client)  # the page before the fit starts
        seen = {f["fit"] for f in data_json(client)["fits"] if f["status"] == "finished"}
        fit = wait_for(running, timeout=300, what="a running fit at epoch 3")
        url = dashboard_url(client)
        dom = headless(browser, url, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout.decode()
        rendered = int(html.split('data-epochs="', 1)[1].split('"', 1)[0])
        assert 3 <= rendered <= epochs
        assert 'data-metric="loss"' in html and 'data-metric="mae"' in html and "<polyline" in html
        assert "running" in html and fit["fit"] in html
        keep = Path(os.environ.get("DASKML_TEST_ARTIFACTS") or tmp_path)
        keep.mkdir(parents=True, exist_ok=True)
        shot = keep / "dashboard-daskml.png"
        snap = headless(browser, url, f"--screenshot={shot}")
        assert snap.returncode == 0 and shot.exists(), snap.stderr[-2000:]
        print(f"screenshot of the running fit's page: {shot}")
    finally:
        thread.join(timeout=300)
    assert "history" in box, "the fit did not finish"
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"), dtype=np.int64)
    assert img.shape[:2] == (900, 1280)
    assert img.std() > 5, "a blank screenshot"
    # the curves are drawn: pixels of the train line's colour (#1f77b4) and the validation line's (#ff7f0e)
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        near = (np.abs(img - np.array(rgb)).sum(axis=2) < 40).sum()
        assert near > 200, f"no curve of colour {rgb} in the screenshot"
    final = wait_for(lambda: (p := data_json(client, fit["fit"])["fit"])["status"] == "finished" and p,
                     what="the fit's end")
    assert len(final["history"]["loss"]) == epochs
    json.dumps(final)
