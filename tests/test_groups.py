"""Many models: ``fit_groups`` on real flights, one model per aircraft (``tailnum``).

Every check compares against what a user would do by hand: a separate single-process
``model.fit`` per group on the same rows, batches and starting weights; the group's own
model (``model_for``) or the fallback model, row by row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform, write_csv_shards
from daskml_scale.exceptions import ArgumentError, BundleError, MissingColumnError
from daskml_scale.groups import GroupBundle, plan
from daskml_scale.groups.spec import stack_plan

EPOCHS, BATCH, VAL, MIN_ROWS, SEED = 3, 16, 0.2, 40, 3


def build_model(n_features: int):
    import keras

    model = keras.Sequential([
        keras.Input((n_features,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def build_batchnorm_model(n_features: int):
    import keras

    model = keras.Sequential([
        keras.Input((n_features,)), keras.layers.Dense(8, activation="relu"), keras.layers.BatchNormalization(),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.fixture(scope="module")
def table():
    """Real flights of 36 aircraft: 28 with at least MIN_ROWS flights, 8 with fewer, and
    rows without a tailnum (they belong to no group)."""
    df = flights().iloc[:60000]
    counts = df["tailnum"].value_counts()
    big = sorted(counts[(counts >= MIN_ROWS + 5) & (counts <= 90)].index)[:28]
    small = sorted(counts[(counts >= 8) & (counts < MIN_ROWS - 5)].index)[:8]
    rows = df[df["tailnum"].isin(big + small)]
    no_tail = df[df["tailnum"].isna()].iloc[:20]
    out = pd.concat([rows, no_tail]).sort_values("id").reset_index(drop=True)
    return out, big, small


def preprocessor():
    return daskml_scale.Preprocessor(target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL,
                                     transform=flights_transform)


@pytest.fixture(scope="module")
def fitted(client, table):
    df, _, _ = table
    pre = preprocessor()
    models = daskml_scale.fit_groups(
        build_model, df, by="tailnum", preprocessor=pre, epochs=EPOCHS, batch_size=BATCH, validation_fraction=VAL,
        min_rows=MIN_ROWS, seed=SEED, fallback="global", client=client,
    )
    return models, pre


def separate_fit(models, pre, rows: pd.DataFrame, key):
    """What a user writes for one group: its own model and model.fit, epoch by epoch,
    on the same held-out split and batch order, from the same starting weights."""
    X, y = pre.transform(rows)
    model = build_model(pre.n_features_)
    model.set_weights(models.initial_weights_)
    held = plan.held_out(len(X), VAL, SEED, (key,))
    Xt, yt = X[~held], y[~held]
    history = {"loss": [], "val_loss": []}
    for epoch in range(EPOCHS):
        order = plan.epoch_order(len(Xt), SEED, epoch, (key,))
        h = model.fit(Xt[order], yt[order], batch_size=BATCH, shuffle=False, epochs=1, verbose=0,
                      validation_data=(X[held], y[held]))
        history["loss"] += h.history["loss"]
        history["val_loss"] += h.history["val_loss"]
    return model, history, int((~held).sum())


def test_stacked_fit_equals_separate_single_process_fits(fitted, table):
    models, pre = fitted
    df, big, small = table
    assert models.mode_ == "stacked"
    assert sorted(models.groups_) == sorted(big)
    sizes = {k: int(df[(df.tailnum == k) & df.arr_delay.notna()].shape[0]) for k in big}
    by_size = sorted(big, key=lambda k: sizes[k])
    picks = [by_size[0], by_size[len(by_size) // 3], by_size[2 * len(by_size) // 3], by_size[-1]]
    for key in picks:
        ref, history, n_train = separate_fit(models, pre, df[df.tailnum == key], key)
        ours = models.weights_for(key)
        for a, b in zip(ref.get_weights(), ours):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5, err_msg=f"group {key}")
        mine = models.history_[models.history_.group == key].sort_values("epoch")
        np.testing.assert_allclose(mine["loss"], history["loss"], rtol=1e-4)
        np.testing.assert_allclose(mine["val_loss"], history["val_loss"], rtol=1e-4)
        assert (mine["rows"] == n_train).all()
        # the plain Keras model of the group predicts as the separate fit's model
        X, _ = pre.transform(df[df.tailnum == key])
        np.testing.assert_allclose(models.model_for(key).predict(X, verbose=0), ref.predict(X, verbose=0),
                                   rtol=1e-4, atol=1e-3)
    # the models differ between groups: training happened per group
    a, b = models.weights_for(picks[0]), models.weights_for(picks[-1])
    assert not np.allclose(a[0], b[0])


def test_groups_under_min_rows_get_no_model_and_the_fallback_is_global(fitted, table):
    models, pre = fitted
    df, big, small = table
    assert set(models.small_groups_) == set(small)
    for key in small:
        assert models.small_groups_[key] == int(df[(df.tailnum == key) & df.arr_delay.notna()].shape[0]) < MIN_ROWS
        assert key not in models
        with pytest.raises(KeyError, match="min_rows"):
            models.model_for(key)
    assert models.fallback_ is not None
    assert models.summary_["fallback"]["loss"] > 0
    h = models.history_
    assert set(h.columns) >= {"group", "epoch", "loss", "val_loss", "rows"}
    assert len(h) == len(big) * EPOCHS and h["loss"].notna().all()


def mixed_rows(df, big, small):
    """Rows of many groups interleaved, with small groups, an unseen aircraft and no tailnum."""
    rows = pd.concat([
        df[df.tailnum.isin(big[:10])].groupby("tailnum").head(3),
        df[df.tailnum.isin(small[:3])].groupby("tailnum").head(2),
        df[df.tailnum.isna()].head(2),
        df[df.tailnum == big[0]].head(2).assign(tailnum="N-NEVER-SEEN"),
    ])
    rows = rows.drop(columns=["arr_delay"]).sample(frac=1.0, random_state=0).reset_index(drop=True)
    return rows


def test_bundle_round_trip_and_row_by_row_routing(fitted, table, tmp_path):
    models, pre = fitted
    df, big, small = table
    url = str(tmp_path / "tails.bundle")
    daskml_scale.save_bundle(models, pre, url)
    bundle = daskml_scale.load_bundle(url)
    assert isinstance(bundle, GroupBundle)
    assert sorted(bundle.groups) == sorted(models.groups_)
    info = bundle.info()
    assert info["groups"]["count"] == len(big) and info["groups"]["fallback"] == "global"
    assert info["groups"]["by"] == ["tailnum"]
    for key in big[:3]:
        for a, b in zip(bundle.model_for(key).get_weights(), models.weights_for(key)):
            np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(bundle.history().reset_index(drop=True),
                                  models.history_.reset_index(drop=True), check_dtype=False)

    rows = mixed_rows(df, big, small)
    pred = bundle.predict_frame(rows)
    assert list(pred.index) == list(rows.index)
    X, _ = pre.transform(rows, with_target=False)
    for i, row in rows.iterrows():
        key = row["tailnum"]
        got = pred.loc[i]
        if isinstance(key, str) and key in big:
            want = models.model_for(key)(X[i : i + 1]).numpy()[0, 0]
            assert got["route"] == "group" and got["route_reason"] == ""
        else:
            want = models.fallback_(X[i : i + 1]).numpy()[0, 0]
            assert got["route"] == "fallback"
            expected = "missing group key" if not isinstance(key, str) else (
                "below min_rows" if key in small else "unseen group")
            assert got["route_reason"] == expected
        np.testing.assert_allclose(got["prediction"], want, rtol=1e-4, atol=1e-3)


def test_bundle_refuses_a_corrupt_file(fitted, tmp_path):
    models, pre = fitted
    url = str(tmp_path / "t.bundle")
    daskml_scale.save_bundle(models, pre, url)
    data = open(url, "rb").read()
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError):
        daskml_scale.load_bundle(str(bad))


def test_predict_and_predict_files_route_every_row(client, fitted, table, tmp_path):
    import dask.dataframe as dd

    models, pre = fitted
    df, big, small = table
    url = str(tmp_path / "tails.bundle")
    daskml_scale.save_bundle(models, pre, url)
    bundle = daskml_scale.load_bundle(url)
    rows = mixed_rows(df, big, small)
    expected = bundle.predict_frame(rows)
    got = daskml_scale.predict(url, dd.from_pandas(rows, npartitions=3), keep="tailnum").compute()
    assert list(got.columns) == ["tailnum", "prediction", "route", "route_reason"]
    np.testing.assert_allclose(got["prediction"].to_numpy(), expected["prediction"].to_numpy(), rtol=1e-5)
    assert list(got["route"]) == list(expected["route"])

    write_csv_shards(rows, str(tmp_path / "in"), 2)
    report = daskml_scale.predict_files(url, str(tmp_path / "in"), str(tmp_path / "out"), keep="tailnum")
    assert not report.failed, report.failed
    out = pd.concat([pd.read_csv(tmp_path / "out" / f"part-00{i}.csv", keep_default_na=False) for i in range(2)],
                    ignore_index=True)
    np.testing.assert_allclose(out["prediction"].astype(float), expected["prediction"].to_numpy(), rtol=1e-4)
    assert list(out["route_reason"]) == list(expected["route_reason"])


def test_predict_refuses_a_dask_array_for_a_group_bundle(client, fitted, tmp_path):
    import dask.array as da

    models, pre = fitted
    url = str(tmp_path / "arr.bundle")
    daskml_scale.save_bundle(models, pre, url)
    X = da.zeros((10, pre.n_features_), chunks=5, dtype="f4")
    with pytest.raises(ArgumentError, match="group column.*tailnum"):
        daskml_scale.predict(url, X)


def test_per_group_scaling_standardizes_each_group_with_its_own_statistics(client, table, tmp_path):
    df, big, small = table
    pre = preprocessor()
    models = daskml_scale.fit_groups(
        build_model, df, by="tailnum", preprocessor=pre, epochs=EPOCHS, batch_size=BATCH, validation_fraction=VAL,
        min_rows=MIN_ROWS, seed=SEED, fallback="global", fallback_epochs=1, client=client, per_group_scaling=True,
    )
    sc = models.scaling_
    assert sc is not None and sc.columns == list(pre.numeric) and len(sc) == len(big)
    k = len(pre.numeric)
    m = np.array([pre.means_[c] for c in pre.numeric])
    s = np.array([pre.scales_[c] for c in pre.numeric])
    for key in (big[0], big[-1]):
        rows = df[df.tailnum == key]
        X, y = pre.transform(rows)
        held = plan.held_out(len(X), VAL, SEED, (key,))
        # the statistics of the group's training rows, in the raw columns' units
        raw = X[:, :k].astype(np.float64) * s + m
        want_mean, want_sd = raw[~held].mean(0), raw[~held].std(0)
        i = models.index_of(key)
        np.testing.assert_allclose(sc.means[i], want_mean, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(sc.scales[i], np.where(want_sd > 1e-9, want_sd, 1.0), rtol=1e-5, atol=1e-6)
        assert not np.allclose(sc.means[i], m)  # a group's own means, not the global ones
        Xg = X.copy()
        Xg[:, :k] = (raw - sc.means[i]) / sc.scales[i]
        np.testing.assert_allclose(models.transform_for(key, X), Xg, rtol=1e-5, atol=1e-5)
        # a separate fit on the group's rows, scaled with the group's statistics, gives the same model
        ref = build_model(pre.n_features_)
        ref.set_weights(models.initial_weights_)
        for epoch in range(EPOCHS):
            order = plan.epoch_order(int((~held).sum()), SEED, epoch, (key,))
            ref.fit(Xg[~held][order], y[~held][order], batch_size=BATCH, shuffle=False, epochs=1, verbose=0)
        for a, b in zip(ref.get_weights(), models.weights_for(key)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5, err_msg=f"group {key}")

    # stored in the bundle, applied at prediction; other groups' rows use the global statistics
    url = str(tmp_path / "scaled.bundle")
    daskml_scale.save_bundle(models, pre, url)
    bundle = daskml_scale.load_bundle(url)
    assert bundle.info()["groups"]["per_group_scaling"] is True
    np.testing.assert_array_equal(bundle.scaling.means, sc.means)
    rows = mixed_rows(df, big, small)
    pred = bundle.predict_frame(rows)
    X, _ = pre.transform(rows, with_target=False)
    for i, row in rows.iterrows():
        key = row["tailnum"]
        if isinstance(key, str) and key in big:
            want = models.model_for(key)(models.transform_for(key, X[i : i + 1])).numpy()[0, 0]
            assert pred.loc[i, "route"] == "group"
        else:
            want = models.fallback_(X[i : i + 1]).numpy()[0, 0]
            assert pred.loc[i, "route"] == "fallback"
        np.testing.assert_allclose(pred.loc[i, "prediction"], want, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def loop_fitted(client, table):
    df, _, _ = table
    pre = preprocessor()
    models = daskml_scale.fit_groups(
        build_model, df, by="tailnum", preprocessor=pre, epochs=EPOCHS, batch_size=BATCH, validation_fraction=VAL,
        min_rows=MIN_ROWS, seed=SEED, fallback=None, mode="loop", client=client,
    )
    return models, pre


def test_loop_mode_trains_the_same_models(fitted, loop_fitted):
    stacked, _ = fitted
    loop, _ = loop_fitted
    assert loop.mode_ == "loop" and loop.groups_ == stacked.groups_
    for key in stacked.groups_:
        for a, b in zip(loop.weights_for(key), stacked.weights_for(key)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"group {key}")
    np.testing.assert_allclose(loop.history_["val_loss"], stacked.history_["val_loss"], rtol=1e-4)


def test_without_fallback_other_groups_get_an_empty_prediction_with_a_reason(loop_fitted, table, tmp_path):
    models, pre = loop_fitted
    df, big, small = table
    assert models.fallback_ is None
    url = str(tmp_path / "nofb.bundle")
    daskml_scale.save_bundle(models, pre, url)
    bundle = daskml_scale.load_bundle(url)
    assert bundle.info()["groups"]["fallback"] is None
    rows = mixed_rows(df, big, small)
    pred = bundle.predict_frame(rows)
    known = rows["tailnum"].isin(big).to_numpy()
    assert pred.loc[known, "prediction"].notna().all()
    assert pred.loc[~known, "prediction"].isna().all()
    assert set(pred.loc[~known, "route"]) == {"none"}
    assert set(pred.loc[~known, "route_reason"]) == {"unseen group", "below min_rows", "missing group key"}


def test_an_architecture_that_cannot_be_stacked_trains_in_loop_mode(client, table):
    import keras

    spec, why = stack_plan(_built(build_batchnorm_model))
    assert spec is None and "BatchNormalization" in why
    df, big, _ = table
    pre = preprocessor()
    with pytest.raises(ArgumentError, match="BatchNormalization"):
        daskml_scale.fit_groups(build_batchnorm_model, df, by="tailnum", preprocessor=pre, mode="stacked",
                                client=client)
    models = daskml_scale.fit_groups(build_batchnorm_model, df[df.tailnum.isin(big[:4])], by="tailnum",
                                     preprocessor=pre, epochs=1, min_rows=MIN_ROWS, fallback=None, client=client)
    assert models.mode_ == "loop" and "BatchNormalization" in models.summary_["stacking"]
    assert sorted(models.groups_) == sorted(big[:4])
    assert isinstance(models.model_for(big[0]), keras.Model)


def _built(build):
    import keras

    model = build(5)
    model(np.zeros((1, 5), np.float32))
    assert isinstance(model, keras.Model)
    return model


def test_stack_plan_names_what_is_in_the_way():
    import keras

    assert stack_plan(_built(build_model))[0] is not None

    def rms(n):
        m = build_model(n)
        m.compile(optimizer="rmsprop", loss="mse")
        return m

    assert "RMSprop" in stack_plan(_built(rms))[1]

    def reg(n):
        m = keras.Sequential([keras.Input((n,)), keras.layers.Dense(2, kernel_regularizer="l2"), keras.layers.Dense(1)])
        m.compile(optimizer="adam", loss="mse")
        return m

    assert "regularizer" in stack_plan(_built(reg))[1]


def test_bad_arguments_fail_with_a_clear_error(client, table):
    df, _, _ = table
    with pytest.raises(MissingColumnError, match="plane"):
        daskml_scale.fit_groups(build_model, df, by="plane", preprocessor=preprocessor(), client=client)
    with pytest.raises(ArgumentError, match="mode"):
        daskml_scale.fit_groups(build_model, df, by="tailnum", preprocessor=preprocessor(), mode="fast", client=client)
    with pytest.raises(ArgumentError, match="fallback"):
        daskml_scale.fit_groups(build_model, df, by="tailnum", preprocessor=preprocessor(), fallback="nearest",
                                client=client)


def test_keys_normalize_across_sources():
    a = pd.DataFrame({"store": [7, 8, None], "item": ["x", "y", "z"]})
    b = pd.DataFrame({"store": ["7", 8.0, 9.5], "item": ["x", "y", "z"]})
    assert plan.row_keys(a, ["store", "item"]) == [(7, "x"), (8, "y"), None]
    assert plan.row_keys(b, ["store", "item"])[1:] == [(8, "y"), (9.5, "z")]
    assert plan.normalize_key((7.0, "x"), 2) == (7, "x")


def test_serve_routes_each_record_and_info_reports_the_groups(fitted, table, tmp_path):
    import asyncio
    import time

    import httpx

    from daskml_scale.serving import create_app

    models, pre = fitted
    df, big, small = table
    url = str(tmp_path / "serve.bundle")
    daskml_scale.save_bundle(models, pre, url)
    bundle = daskml_scale.load_bundle(url)
    rows = mixed_rows(df, big, small)
    records = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
               for r in rows.to_dict("records")]

    async def go():
        app = create_app(bundle)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://groups.test", timeout=60) as c:
                deadline = time.monotonic() + 60
                while (await c.get("/health")).status_code != 200 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                info = (await c.get("/info")).json()
                answer = await c.post("/predict?id=id", json=records)
                missing = await c.post("/predict", json=[{k: v for k, v in records[0].items() if k != "tailnum"}])
                return info, answer, missing

    info, answer, missing = asyncio.run(go())
    assert info["groups"]["count"] == len(big) and info["groups"]["fallback"] == "global"
    assert "tailnum" in info["serving"]["required_fields"]
    assert answer.status_code == 200, answer.text
    out = answer.json()
    expected = bundle.predict_frame(rows)
    assert [o["id"] for o in out] == rows["id"].tolist()
    np.testing.assert_allclose([o["prediction"] for o in out], expected["prediction"].to_numpy(), rtol=1e-4)
    assert [o["route"] for o in out] == expected["route"].tolist()
    assert [o["route_reason"] for o in out] == expected["route_reason"].tolist()
    assert missing.status_code == 422 and "tailnum" in missing.text


def test_cli_train_group_by_writes_a_group_bundle_that_info_and_predict_read(client, table, tmp_path, capsys):
    from daskml_scale.cli import main

    df, big, small = table
    write_csv_shards(df, str(tmp_path / "data"), 2)
    (tmp_path / "model_def.py").write_text(
        "import keras\n\n"
        "def build_model(n_features):\n"
        "    m = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(8, activation='relu'),"
        " keras.layers.Dense(1)])\n"
        "    m.compile(optimizer='adam', loss='mse')\n"
        "    return m\n"
    )
    url = str(tmp_path / "cli.bundle")
    common = ["--scheduler", client.scheduler.address]
    code = main(["train", "--data", str(tmp_path / "data" / "*.csv"), "--target", "arr_delay",
                 "--numeric", *FLIGHTS_NUMERIC, "--categorical", *FLIGHTS_CATEGORICAL,
                 "--transform", "daskml_scale.datasets:flights_transform",
                 "--model", f"{tmp_path / 'model_def.py'}:build_model", "--group-by", "tailnum",
                 "--min-rows", str(MIN_ROWS), "--epochs", "1", "--validation-fraction", "0.2", "--out", url,
                 "--max-group-rows", "100000", *common])
    assert code == 0
    out = capsys.readouterr().out
    assert f"trained {len(big)} group models" in out
    bundle = daskml_scale.load_bundle(url)
    assert isinstance(bundle, GroupBundle) and sorted(bundle.groups) == sorted(big)
    assert main(["info", url]) == 0
    assert f"groups: {len(big)} models by tailnum" in capsys.readouterr().out
    rows = mixed_rows(df, big, small)
    write_csv_shards(rows, str(tmp_path / "in"), 1)
    assert main(["predict", "--bundle", url, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--keep", "tailnum", *common]) == 0
    got = pd.read_csv(tmp_path / "out" / "part-000.csv", keep_default_na=False)
    assert list(got["route"]) == list(bundle.predict_frame(rows)["route"])


def test_a_worker_killed_mid_fit_leaves_every_group_trained_exactly_once(own_client, table):
    import os
    import signal
    import threading
    import time

    client = own_client
    df, big, _ = table
    pids = client.run(os.getpid)
    args = dict(by="tailnum", epochs=25, batch_size=BATCH, validation_fraction=VAL, min_rows=MIN_ROWS, seed=SEED,
                fallback=None, client=client, npartitions=4)
    result: dict = {}

    def run():
        try:
            result["models"] = daskml_scale.fit_groups(build_model, df, preprocessor=preprocessor(), **args)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for worker, keys in client.processing().items():
            if any("-train-" in str(k) for k in keys) and worker in pids:
                os.kill(pids[worker], signal.SIGKILL)
                killed = worker
                break
        time.sleep(0.05)
    thread.join(600)
    assert killed is not None, "no training task was seen running: the test did not kill anything"
    assert "error" not in result, result.get("error")
    models = result["models"]
    assert sorted(models.groups_) == sorted(big) and len(set(models.groups_)) == len(models.groups_)
    assert len(models.history_) == len(big) * 25
    clean = daskml_scale.fit_groups(build_model, df, preprocessor=preprocessor(), **args)
    for key in big:
        for a, b in zip(models.weights_for(key), clean.weights_for(key)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"group {key}")
