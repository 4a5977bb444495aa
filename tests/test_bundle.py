"""The bundle file: round trips (local and S3), safe loading, clear errors on bad files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import keras
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale import Bundle, BundleError, NotFittedError, Preprocessor, UnsafeBundleError, load_bundle, save_bundle
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform

NUMERIC = DIAMONDS_NUMERIC + ["volume"]


def train_regressor(rows: int = 8192, seed: int = 0) -> tuple[keras.Model, Preprocessor, pd.DataFrame]:
    """A small MLP on diamonds (log price), trained with plain Keras for a few steps."""
    keras.utils.set_random_seed(seed)
    df = diamonds()
    pre = Preprocessor(
        target="log_price", numeric=NUMERIC, categorical=DIAMONDS_CATEGORICAL, transform=diamonds_transform
    ).fit(df)
    X, y = pre.transform(df.iloc[:rows])
    model = keras.Sequential(
        [keras.Input((X.shape[1],)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    model.fit(X, y, epochs=1, batch_size=256, verbose=0)
    return model, pre, df


def train_classifier(seed: int = 0) -> tuple[keras.Model, Preprocessor, pd.DataFrame]:
    """Predict the cut (5 classes) from the other columns."""
    keras.utils.set_random_seed(seed)
    df = diamonds()
    pre = Preprocessor(target="cut", numeric=DIAMONDS_NUMERIC, categorical=["color", "clarity"]).fit(df)
    X, y = pre.transform(df.iloc[:4096])
    model = keras.Sequential(
        [keras.Input((X.shape[1],)), keras.layers.Dense(16, activation="relu"),
         keras.layers.Dense(len(pre.classes_), activation="softmax")]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(X, y, epochs=1, batch_size=256, verbose=0)
    return model, pre, df


def reference(model: keras.Model, pre: Preprocessor, df: pd.DataFrame) -> np.ndarray:
    """Single-process ``model(X)`` on the same rows."""
    X, _ = pre.transform(df)
    return np.asarray(model(X, training=False))


@pytest.fixture(scope="module")
def regressor():
    return train_regressor()


@pytest.fixture(scope="module")
def saved(regressor, tmp_path_factory):
    model, pre, df = regressor
    path = str(tmp_path_factory.mktemp("bundle") / "price.bundle")
    save_bundle(model, pre, path, training_summary={"epochs": 1, "loss": 0.5}, metadata={"owner": "tests"})
    return path


def test_round_trip_local(regressor, saved):
    model, pre, df = regressor
    with open(saved, "rb") as f:
        raw = f.read()
    b = load_bundle(saved)
    assert b.content_hash == hashlib.sha256(raw).hexdigest()
    assert b.to_bytes() == raw
    assert b.task == "regression" and b.output_names == ["prediction"]
    assert b.preprocessor == pre
    assert b.input_schema == pre.input_schema_ and "carat" in b.input_schema
    info = b.info()
    json.dumps(info)  # JSON-able
    assert info["versions"]["keras"] == keras.__version__
    assert info["versions"]["daskml_scale"] == daskml_scale.__version__
    assert info["training_summary"] == {"epochs": 1, "loss": 0.5}
    assert info["metadata"] == {"owner": "tests"}
    assert info["feature_names"] == pre.feature_names_
    assert info["content_hash"] == b.content_hash
    # the zip holds exactly the three documented parts
    with zipfile.ZipFile(saved) as zf:
        assert sorted(zf.namelist()) == ["metadata.json", "model.keras", "preprocessor.json"]
    # predictions equal the live model's, same index, model called in batches
    rows = df.sample(5000, random_state=1)
    out = b.predict_frame(rows, batch_size=1000)
    assert list(out.columns) == ["prediction"]
    assert out.index.equals(rows.index)
    np.testing.assert_allclose(out["prediction"].to_numpy(), reference(model, pre, rows)[:, 0], atol=1e-5)
    # from_bytes gives the same bundle
    b2 = Bundle.from_bytes(raw)
    assert b2.content_hash == b.content_hash
    np.testing.assert_allclose(b2.predict_frame(rows)["prediction"], out["prediction"], atol=1e-6)


def test_save_is_atomic_and_overwrites(regressor, tmp_path):
    model, pre, _ = regressor
    path = tmp_path / "m.bundle"
    path.write_bytes(b"old")
    assert save_bundle(model, pre, str(path)) == str(path)
    assert os.listdir(tmp_path) == ["m.bundle"]  # no temporary file left
    assert load_bundle(str(path)).task == "regression"


def test_round_trip_s3(regressor, s3):
    model, pre, df = regressor
    url = s3.url("models", "price.bundle")
    save_bundle(model, pre, url, storage_options=s3.storage_options)
    fs = s3.filesystem()
    assert fs.exists(url)
    raw = fs.cat_file(url)
    b = load_bundle(url, storage_options=s3.storage_options)
    assert b.content_hash == hashlib.sha256(raw).hexdigest()
    rows = df.iloc[:2000]
    np.testing.assert_allclose(
        b.predict_frame(rows)["prediction"].to_numpy(), reference(model, pre, rows)[:, 0], atol=1e-5
    )


def test_lambda_layer_is_refused_unless_opted_in(regressor, tmp_path):
    _, pre, df = regressor
    model = keras.Sequential(
        [keras.Input((len(pre.feature_names_),)), keras.layers.Lambda(lambda z: z * 2.0), keras.layers.Dense(1)]
    )
    path = str(tmp_path / "lambda.bundle")
    save_bundle(model, pre, path)
    with pytest.raises(UnsafeBundleError, match=r"safe_mode=False"):
        load_bundle(path)
    with pytest.raises(UnsafeBundleError):
        Bundle.from_bytes(open(path, "rb").read())
    b = load_bundle(path, safe_mode=False)
    rows = df.iloc[:100]
    np.testing.assert_allclose(
        b.predict_frame(rows)["prediction"].to_numpy(), reference(model, pre, rows)[:, 0], atol=1e-5
    )


def _rezip(raw: bytes, *, drop: str | None = None, replace: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if name == drop:
                continue
            dst.writestr(name, (replace or {}).get(name, src.read(name)))
    return out.getvalue()


def test_corrupt_incomplete_and_future_bundles_are_clear_errors(saved, tmp_path):
    raw = open(saved, "rb").read()
    with pytest.raises(BundleError, match="not a daskml_scale bundle"):
        Bundle.from_bytes(b"this is not a zip file at all")
    with pytest.raises(BundleError):
        Bundle.from_bytes(raw[: len(raw) // 2])  # truncated
    flipped = bytearray(raw)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        info = zf.getinfo("model.keras")
    flipped[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF  # a byte inside model.keras
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.from_bytes(bytes(flipped))
    with pytest.raises(BundleError, match="missing \\['preprocessor.json'\\]"):
        Bundle.from_bytes(_rezip(raw, drop="preprocessor.json"))
    meta = json.loads(zipfile.ZipFile(io.BytesIO(raw)).read("metadata.json"))
    meta["format_version"] = 99
    with pytest.raises(BundleError, match="newer.*Upgrade daskml_scale"):
        Bundle.from_bytes(_rezip(raw, replace={"metadata.json": json.dumps(meta).encode()}))
    with pytest.raises(BundleError, match="model"):
        Bundle.from_bytes(_rezip(raw, replace={"model.keras": b"garbage"}))
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(str(tmp_path / "nothing.bundle"))
    # a BundleError is also a ValueError
    assert issubclass(BundleError, ValueError)


def test_unimportable_transform_must_be_passed_again(tmp_path):
    df = diamonds().iloc[:2000]
    pre = Preprocessor(numeric=["carat", "twice"], transform=lambda d: d.assign(twice=d["carat"] * 2)).fit(df)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = str(tmp_path / "t.bundle")
    save_bundle(model, pre, path)
    b = load_bundle(path)
    with pytest.raises(NotFittedError, match="transform"):
        b.predict_frame(df)
    b = load_bundle(path, transform=lambda d: d.assign(twice=d["carat"] * 2))
    np.testing.assert_allclose(b.predict_frame(df)["prediction"], reference(model, pre, df)[:, 0], atol=1e-5)


def test_classification_outputs(tmp_path):
    model, pre, df = train_classifier()
    path = str(tmp_path / "cut.bundle")
    save_bundle(model, pre, path)
    b = load_bundle(path)
    assert b.task == "classification"
    assert b.output_names == [f"proba_{c}" for c in pre.classes_] + ["label"]
    rows = df.iloc[:3000]
    out = b.predict_frame(rows)
    ref = reference(model, pre, rows)
    np.testing.assert_allclose(out[b.output_names[:-1]].to_numpy(), ref, atol=1e-5)
    assert out["label"].tolist() == [pre.classes_[i] for i in ref.argmax(axis=1)]
    assert list(b.empty_frame().columns) == b.output_names


def test_binary_integer_target_answers_probability_and_label(tmp_path):
    """An integer 0/1 target (an expensive diamond) is a classification under task="auto":
    a one-unit sigmoid model's bundle answers both probabilities and the label."""
    keras.utils.set_random_seed(0)
    df = diamonds().sample(n=6000, random_state=0).reset_index(drop=True)
    df = df.assign(expensive=(df["price"] > 4000).astype("int64"))
    pre = Preprocessor(target="expensive", numeric=DIAMONDS_NUMERIC, categorical=DIAMONDS_CATEGORICAL).fit(df)
    assert pre.task_ == "classification" and pre.classes_ == ["0", "1"]
    X, y = pre.transform(df)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    model.fit(X, y, epochs=2, batch_size=256, verbose=0)
    path = save_bundle(model, pre, str(tmp_path / "expensive.bundle"))
    b = load_bundle(path)
    assert b.task == "classification" and b.output_names == ["proba_0", "proba_1", "label"]
    assert b.info()["classes"] == ["0", "1"]
    out = b.predict_frame(df.drop(columns=["expensive"]).iloc[:500])
    p = reference(model, pre, df.iloc[:500])[:, 0]
    np.testing.assert_allclose(out["proba_1"].to_numpy(), p, atol=1e-6)
    np.testing.assert_allclose(out["proba_0"].to_numpy(), 1 - p, atol=1e-6)
    assert out["label"].tolist() == ["1" if v > 0.5 else "0" for v in p]
    # the same target as a regression, on request
    reg = Preprocessor(target="expensive", numeric=DIAMONDS_NUMERIC, task="regression").fit(df)
    linear = keras.Sequential([keras.Input((reg.n_features_,)), keras.layers.Dense(1)])
    assert load_bundle(save_bundle(linear, reg, str(tmp_path / "reg.bundle"))).output_names == ["prediction"]
    # a linear output cannot be a probability: said when saving (and by the CLI before training)
    with pytest.raises(BundleError, match="sigmoid"):
        save_bundle(keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(1)]), pre,
                    str(tmp_path / "bad.bundle"))


def test_save_checks_model_against_preprocessor(regressor, tmp_path):
    _, pre, _ = regressor
    wrong = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(BundleError, match="features"):
        save_bundle(wrong, pre, str(tmp_path / "x.bundle"))
    with pytest.raises(BundleError, match="fitted"):
        save_bundle(wrong, Preprocessor(numeric=["a"]), str(tmp_path / "x.bundle"))
    assert not os.listdir(tmp_path)
