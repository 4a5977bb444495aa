"""Wide, high-cardinality categoricals: integer codes (O(columns) per row) feeding
embeddings in a model with named inputs, through fit, the bundle, predict,
predict_files and serve."""

from __future__ import annotations

import asyncio

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale import backend
from daskml_scale.bundle import load_bundle, save_bundle
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform
from daskml_scale.exceptions import ArgumentError, BundleError

from .test_serving import served

WIDE = ["dest", "tailnum"]


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    # 4 months of flights: every tailnum has a few rows, many appear in one month only
    df = flights()
    return df[df["month"] <= 4].reset_index(drop=True)


def wide_pre(encoding="int", **kw) -> daskml_scale.Preprocessor:
    return daskml_scale.Preprocessor(
        target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=[*FLIGHTS_CATEGORICAL, *WIDE],
        transform=flights_transform, categorical_encoding=encoding, max_categories=10_000, **kw,
    )


@pytest.fixture(scope="module")
def pre(table) -> daskml_scale.Preprocessor:
    return wide_pre({"dest": "int", "tailnum": "int"}).fit(table)


def build(pre, seed=0, lr=3e-3):
    import keras

    with daskml_scale.seeded(seed):
        inputs, features = daskml_scale.model_inputs(pre, embedding_dims={"tailnum": 8, "dest": 4})
        hidden = keras.layers.Dense(32, activation="relu")(features)
        model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(keras.optimizers.Adam(lr), "mse")
    return model


# ------------------------------------------------------------------------ the encoding
def test_int_codes_are_one_column_each_zero_for_unseen_and_missing(table, pre):
    one_hot = wide_pre("one_hot").fit(table)
    X, y = pre.transform(table.head(500))
    Xo, yo = one_hot.transform(table.head(500))
    n_dense = len(FLIGHTS_NUMERIC) + sum(len(pre.categories_[c]) for c in FLIGHTS_CATEGORICAL)
    # O(columns): one column per coded categorical, against one per category one-hot
    assert X.shape[1] == n_dense + 2
    assert Xo.shape[1] == n_dense + len(pre.categories_["dest"]) + len(pre.categories_["tailnum"])
    assert Xo.shape[1] > 10 * X.shape[1]
    np.testing.assert_array_equal(X[:, :n_dense], Xo[:, :n_dense])
    np.testing.assert_array_equal(y, yo)
    assert pre.feature_names_[-2:] == WIDE
    assert pre.vocabulary_sizes_ == {c: len(pre.categories_[c]) + 1 for c in WIDE}
    # the code is the category's place in the sorted categories, counted from 1
    kept = flights_transform(table.head(500))
    for j, col in enumerate(WIDE):
        expected = [pre.categories_[col].index(v) + 1 if isinstance(v, str) else 0 for v in kept[col]]
        np.testing.assert_array_equal(X[:, n_dense + j], expected)
    rows = table.head(3).copy()
    rows["tailnum"] = ["N-NEVER-SEEN", None, rows["tailnum"].iloc[2]]
    Xn, _ = pre.transform(rows, with_target=False)
    assert Xn[0, -1] == 0 and Xn[1, -1] == 0 and Xn[2, -1] == pre.categories_["tailnum"].index(rows["tailnum"].iloc[2]) + 1


def test_encoding_round_trips_and_bad_settings_are_named(table, pre):
    again = daskml_scale.Preprocessor.from_json(pre.to_json())
    assert again == pre and again.encodings_ == pre.encodings_
    np.testing.assert_array_equal(again.transform(table.head(50))[0], pre.transform(table.head(50))[0])
    with pytest.raises(ArgumentError, match="'dist'"):
        wide_pre({"dist": "int"})
    with pytest.raises(ArgumentError, match="'embedding'"):
        wide_pre({"dest": "embedding"})
    with pytest.raises(ArgumentError, match="categorical_encoding"):
        wide_pre("hash")


def test_model_inputs_name_the_dense_block_and_each_coded_column(pre):
    inputs, features = daskml_scale.model_inputs(pre)
    assert set(inputs) == {"numeric", "dest", "tailnum"}
    assert inputs["numeric"].shape[-1] == pre.n_features_ - 2
    assert inputs["tailnum"].dtype == "int32"
    with pytest.raises(ArgumentError, match="'carrier'"):
        daskml_scale.model_inputs(pre, embedding_dims={"carrier": 3})


def test_a_model_whose_inputs_do_not_match_is_refused_by_name(client, table, pre):
    import keras

    a, b = keras.Input((pre.n_features_ - 2,), name="numeric"), keras.Input((1,), name="destination", dtype="int32")
    z = keras.layers.Concatenate()([a, keras.layers.Flatten()(keras.layers.Embedding(200, 2)(b))])
    model = keras.Model({"numeric": a, "destination": b}, keras.layers.Dense(1)(z))
    model.compile("adam", "mse")
    with pytest.raises(ArgumentError, match=r"missing \['dest', 'tailnum'\]; unexpected \['destination'\]"):
        daskml_scale.fit(model, table.head(1000), preprocessor=pre, epochs=1, client=client)
    with pytest.raises(BundleError, match="model_inputs"):
        save_bundle(model, pre, "memory://never-written.bundle")
    flat = keras.Sequential([keras.Input((12,)), keras.layers.Dense(1)])
    flat.compile("adam", "mse")
    with pytest.raises(ArgumentError, match=r"one input per name in \['numeric', 'dest', 'tailnum'\]"):
        daskml_scale.fit(flat, table.head(1000), preprocessor=pre, epochs=1, client=client)


# ---------------------------------------------------------------------------- training
STRATEGIES = {
    "allreduce": lambda: daskml_scale.AllReduce(every=16),
    "averaging": lambda: daskml_scale.ModelAveraging(sync_every=16),
    "parameter_server": lambda: daskml_scale.ParameterServer(push_every=8),
}


@pytest.fixture(scope="module")
def data(table):
    return dd.from_pandas(table, npartitions=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_fit_trains_the_embeddings_with_every_strategy(client, data, table, pre, name):
    model = build(pre)
    emb = model.get_layer("tailnum_embedding")
    before = np.array(emb.get_weights()[0])
    X, y = pre.transform(table.sample(3000, random_state=1))
    inputs = backend.split_inputs(backend.input_layout_of(model) or _layout(model, pre), X)
    start = float(model.evaluate(inputs, y, verbose=0))
    history = daskml_scale.fit(
        model, data, preprocessor=pre, strategy=STRATEGIES[name](), epochs=2, batch_size=128,
        validation_fraction=0.1, client=client, seed=0,
    )
    assert np.isfinite(history.history["val_loss"]).all()
    end = float(model.evaluate(inputs, y, verbose=0))
    assert end < 0.8 * start, (start, end)
    moved = np.abs(np.array(emb.get_weights()[0]) - before).max(axis=1)
    assert (moved > 0).sum() > 100  # the rows of the tailnums seen in training moved


def _layout(model, pre):
    from daskml_scale.features import attach_layout

    return attach_layout(model, pre)


# ------------------------------------------------------------- bundle, predict, serve
@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory, table, pre):
    """A model with named inputs trained single-process (the paths under test are the
    bundle's), saved as a bundle."""
    model = build(pre)
    X, y = pre.transform(table)
    model.fit(backend.split_inputs(_layout(model, pre), X), y, epochs=1, batch_size=512, verbose=0)
    url = str(tmp_path_factory.mktemp("wide") / "wide.bundle")
    save_bundle(model, pre, url)
    return url, model


@pytest.mark.slow
def test_bundle_predict_and_predict_files_route_the_named_inputs(client, tmp_path, table, pre, wide_bundle):
    url, model = wide_bundle
    rows = table.iloc[:2000].drop(columns=["arr_delay"]).reset_index(drop=True)
    rows.loc[5, "tailnum"] = "N-NEVER-SEEN"  # unseen: code 0
    X, _ = pre.transform(rows, with_target=False)
    expected = model.predict(backend.split_inputs(_layout(model, pre), X), verbose=0, batch_size=4096).ravel()

    bundle = load_bundle(url)
    assert [s.name for s in backend.input_layout_of(bundle.model)] == ["numeric", "dest", "tailnum"]
    np.testing.assert_allclose(bundle.predict_frame(rows)["prediction"].to_numpy(), expected, rtol=1e-4, atol=1e-4)

    got = daskml_scale.predict(url, dd.from_pandas(rows, npartitions=3)).compute()
    np.testing.assert_allclose(got["prediction"].to_numpy(), expected, rtol=1e-4, atol=1e-4)

    src = tmp_path / "in"
    src.mkdir()
    rows.iloc[:1000].to_csv(src / "a.csv", index=False)
    rows.iloc[1000:].to_csv(src / "b.csv", index=False)
    report = daskml_scale.predict_files(url, str(src), str(tmp_path / "out"), keep="id", client=client)
    assert len(report.done) == 2
    out = pd.concat([pd.read_csv(d["output"]) for d in report.done]).sort_values("id")
    np.testing.assert_allclose(out["prediction"].to_numpy(), expected[np.argsort(rows["id"].to_numpy())], rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_serve_answers_what_the_bundle_predicts(table, pre, wide_bundle):
    url, _ = wide_bundle
    bundle = load_bundle(url)
    rows = table.iloc[100:140].drop(columns=["arr_delay"])
    records = rows.to_dict("records")
    records[3]["tailnum"] = "N-NEVER-SEEN"
    expected = bundle.predict_frame(pd.DataFrame(records))["prediction"].to_numpy()

    async def go():
        async with served(daskml_scale.create_app(bundle)) as c:
            r = await c.post("/predict", json=records)
            assert r.status_code == 200, r.text
            info = (await c.get("/info")).json()
            return r.json(), info

    out, info = asyncio.run(go())
    np.testing.assert_allclose([o["prediction"] for o in out], expected, rtol=1e-5, atol=1e-5)
    assert "tailnum" in {c["name"] for c in info.get("columns", [])} or "tailnum" in str(info)


# --------------------------------------------------------------------------------- CLI
WIDE_MODEL = '''
import keras
import daskml_scale


def build(preprocessor):
    inputs, features = daskml_scale.model_inputs(preprocessor, embedding_dims=4)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(features)))
    model.compile("adam", "mse")
    return model
'''


@pytest.mark.slow
def test_cli_train_embed_writes_a_bundle_that_predicts(remote_cluster, tmp_path, table, capsys):
    from daskml_scale.cli import main
    from daskml_scale.datasets import write_csv_shards

    (tmp_path / "wide_model.py").write_text(WIDE_MODEL)
    write_csv_shards(table.iloc[:6000], str(tmp_path / "train"), 2)
    out = str(tmp_path / "wide.bundle")
    rc = main([
        "train", "--data", str(tmp_path / "train"), "--target", "arr_delay", "--numeric", *FLIGHTS_NUMERIC,
        "--categorical", *FLIGHTS_CATEGORICAL, "--embed", *WIDE, "--max-categories", "5000",
        "--transform", "daskml_scale.datasets:flights_transform", "--model", f"{tmp_path / 'wide_model.py'}:build",
        "--epochs", "1", "--out", out, "--scheduler", remote_cluster.address, "-q",
    ])
    assert rc == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    assert bundle.preprocessor.encodings_ == {**{c: "one_hot" for c in FLIGHTS_CATEGORICAL}, "dest": "int", "tailnum": "int"}
    assert [s.name for s in backend.input_layout_of(bundle.model)] == ["numeric", "dest", "tailnum"]
    pred = bundle.predict_frame(table.iloc[6000:6100].drop(columns=["arr_delay"]))
    assert len(pred) == 100 and np.isfinite(pred["prediction"]).all()
