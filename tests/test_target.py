"""The target column on real data: rows without a target (named by file and line in
every path, or dropped and counted), and the task (a 0/1 target is a classification)."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale import BundleError, DataError, NonFiniteValueError, Preprocessor
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, write_csv_shards
from daskml_scale.outputs import check_model
from daskml_scale.training.worker import prepare_partition

FEATURES = {"numeric": FLIGHTS_NUMERIC, "categorical": FLIGHTS_CATEGORICAL}


def keep_model_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A transform that keeps only the columns it needs (the provenance columns too are gone)."""
    return df[[*FLIGHTS_NUMERIC, *FLIGHTS_CATEGORICAL, *(["arr_delay"] if "arr_delay" in df.columns else [])]]


def small_model(n_features: int, output: str = "linear") -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation=output)])
    if output == "sigmoid":
        model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy", metrics=["accuracy"])
    else:
        model.compile("adam", "mse")
    return model


@pytest.fixture(scope="module")
def raw_flights(tmp_path_factory):
    """6,000 raw flights rows (53 without arr_delay: cancelled flights) in 3 CSV files,
    and the (file, line) of every row without a target."""
    df = flights().iloc[:6000]
    root = tmp_path_factory.mktemp("raw-flights")
    paths = write_csv_shards(df, str(root), 3)
    missing = set()
    for path in paths:
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                if row["arr_delay"] == "":
                    missing.add((path, line))
    assert len(missing) == int(df["arr_delay"].isna().sum()) == 53
    return root, df, missing


def _check_names_a_missing_target(err: DataError, missing: set[tuple[str, int]]) -> None:
    assert (err.path, err.line) in missing, (err.path, err.line)
    assert err.column == "arr_delay"
    text = str(err)
    assert f"{err.path}, line {err.line}, column 'arr_delay': the target is missing" in text
    assert "missing_target='drop'" in text  # and the fix


# ------------------------------------------------------------------ missing targets
@pytest.mark.parametrize("transform", [None, keep_model_columns], ids=["no-transform", "column-selecting-transform"])
def test_preprocessor_fit_names_the_file_and_line_of_a_missing_target(raw_flights, transform, client):
    root, _, missing = raw_flights
    ddf = daskml_scale.read_csv(str(root / "*.csv"), blocksize=150_000)  # no provenance columns
    assert ddf.npartitions > 3
    with pytest.raises(NonFiniteValueError) as err:
        Preprocessor(target="arr_delay", transform=transform, **FEATURES).fit(ddf)
    _check_names_a_missing_target(err.value, missing)


def test_training_preparation_names_the_file_and_line_of_a_missing_target(raw_flights, client):
    root, df, missing = raw_flights
    pre = Preprocessor(target="arr_delay", **FEATURES).fit(df.dropna(subset=["arr_delay"]))
    ddf = daskml_scale.read_csv(str(root / "*.csv"))
    with pytest.raises(NonFiniteValueError) as err:
        daskml_scale.fit(small_model(pre.n_features_), ddf, preprocessor=pre, epochs=1, verbose=0)
    _check_names_a_missing_target(err.value, missing)
    # and on one partition, where the worker prepares it
    part = ddf.partitions[1].compute()
    with pytest.raises(NonFiniteValueError) as err:
        prepare_partition(part, pre, 0.0, 0, 1)
    _check_names_a_missing_target(err.value, missing)
    assert err.value.path == str(root / "part-001.csv")
    with pytest.raises(NonFiniteValueError) as err:  # and in the preprocessor's own transform
        pre.transform(part)
    assert err.value.path == str(root / "part-001.csv")


def test_rows_filtered_after_reading_are_not_located_by_the_file(raw_flights, client):
    """A partition filtered after reading is not the rows of its file: reading the file
    again would find a row that was filtered out, so the error keeps its row number."""
    root, df, missing = raw_flights
    ddf = daskml_scale.read_csv(str(root / "*.csv"), blocksize=None)
    # the first row without a target of each file is filtered out
    first_of_file = {}
    for path, line in sorted(missing):
        first_of_file.setdefault(path, line)
    removed = {df["id"].iloc[2000 * int(path[-7:-4]) + line - 2] for path, line in first_of_file.items()}  # part-00i.csv
    assert df.set_index("id").loc[sorted(removed), "arr_delay"].isna().all()
    filtered = ddf[~ddf["id"].isin(sorted(removed))]
    with pytest.raises(NonFiniteValueError) as err:
        Preprocessor(target="arr_delay", **FEATURES).fit(filtered)
    kept = missing - set(first_of_file.items())
    assert err.value.path is None or (err.value.path, err.value.line) in kept, (err.value.path, err.value.line)
    assert "the target is missing" in str(err.value)


def test_missing_target_drop_counts_the_rows(raw_flights, client):
    root, df, missing = raw_flights
    ddf = daskml_scale.read_csv(str(root / "*.csv"), blocksize=150_000)
    pre = Preprocessor(target="arr_delay", missing_target="drop", **FEATURES).fit(ddf)
    assert pre.dropped_missing_target_ == len(missing) == 53
    assert pre.n_samples_ == len(df) - 53
    # the statistics are those of the rows kept
    kept = df.dropna(subset=["arr_delay"])
    assert pre.means_["dep_delay"] == pytest.approx(kept["dep_delay"].mean(), rel=1e-9)
    # the workers' preparation drops the same rows and counts them per partition
    prepared = [prepare_partition(p.compute(), pre, 0.0, 0, i) for i, p in enumerate(ddf.to_delayed())]
    assert sum(p["dropped"] for p in prepared) == 53
    assert sum(len(p["X"]) for p in prepared) == len(df) - 53
    np.testing.assert_array_equal(np.concatenate([p["y"] for p in prepared]), kept["arr_delay"].to_numpy("float32"))
    # prediction never drops a row: the target is not used there
    X, y = pre.transform(df, with_target=False)
    assert len(X) == len(df) and y is None
    # training runs on the rows kept
    history = daskml_scale.fit(small_model(pre.n_features_), ddf, preprocessor=pre, epochs=1, verbose=0)
    assert history.daskml_summary["train_rows"] == len(df) - 53
    assert history.daskml_summary["dropped_missing_target"] == 53
    # and the policy survives a round trip (a bundle's preprocessor)
    back = Preprocessor.from_json(pre.to_json())
    assert back.missing_target == "drop" and back.dropped_missing_target_ == 53


def test_missing_target_policy_is_checked():
    with pytest.raises(ValueError, match="missing_target"):
        Preprocessor(target="y", numeric=["x"], missing_target="skip")
    with pytest.raises(ValueError, match="task"):
        Preprocessor(target="y", numeric=["x"], task="binary")


# ------------------------------------------------------------------ the task
def test_task_auto_finds_a_two_valued_integer_target(raw_flights, tmp_path, client):
    _, df, _ = raw_flights
    df = df.dropna(subset=["arr_delay"]).assign(late=lambda d: (d["arr_delay"] > 15).astype("int64"))
    write_csv_shards(df, str(tmp_path), 4)
    ddf = daskml_scale.read_csv(str(tmp_path / "*.csv"))
    assert str(ddf.dtypes["late"]) == "Int64"
    pre = Preprocessor(target="late", **FEATURES).fit(ddf)  # task="auto", in the one pass
    assert pre.task_ == "classification" and pre.classes_ == ["0", "1"]
    assert pre.target_stats_["class_counts"] == {"0": int((df.late == 0).sum()), "1": int((df.late == 1).sum())}
    _, y = pre.transform(df)
    assert y.dtype == np.int64 and y.tolist() == df["late"].tolist()
    # a regression on request, and for integer targets with more values
    assert Preprocessor(target="late", task="regression", **FEATURES).fit(ddf).task_ == "regression"
    assert Preprocessor(target="flight", **FEATURES).fit(df).task_ == "regression"
    # a float 0/1 column stays a regression under "auto"; task="classification" makes it one
    floats = df.assign(late=df["late"].astype("float64"))
    assert Preprocessor(target="late", **FEATURES).fit(floats).classes_ is None
    assert Preprocessor(target="late", task="classification", **FEATURES).fit(floats).classes_ == ["0", "1"]


def test_task_is_decided_over_all_partitions():
    """One partition holds only 0s, another only 1s: two values in all, a classification;
    a third value in a third partition makes it a regression."""
    import dask.dataframe as dd

    frame = pd.DataFrame({"x": np.arange(9.0), "t": pd.array([0, 0, 0, 1, 1, 1, 5, 5, 5], dtype="Int64")})
    two = dd.from_pandas(frame.iloc[:6], npartitions=2)
    pre = Preprocessor(target="t", numeric=["x"]).fit(two, client=None)
    assert pre.classes_ == ["0", "1"]
    three = dd.from_pandas(frame, npartitions=3)
    assert Preprocessor(target="t", numeric=["x"]).fit(three).task_ == "regression"
    # numeric classes sort by value, not as text
    wide = frame.assign(t=frame["t"] * 2 + 8)  # 8, 10, 18
    assert Preprocessor(target="t", numeric=["x"], task="classification").fit(wide).classes_ == ["8", "10", "18"]
    with pytest.raises(DataError, match="task='regression'"):
        Preprocessor(target="c", numeric=["x"], task="regression").fit(frame.assign(c="a"))


@pytest.mark.slow
def test_a_binary_target_end_to_end(raw_flights, tmp_path, client):
    """A 0/1 column of real flights (late arrival): fit on the cluster, bundle, predict
    the probability and the label, file by file."""
    _, df, _ = raw_flights
    df = df.dropna(subset=["arr_delay"]).assign(late=lambda d: (d["arr_delay"] > 15).astype("int64"))
    df = df.drop(columns=["arr_delay"]).reset_index(drop=True)
    train, test = df.iloc[:4800], df.iloc[4800:]
    write_csv_shards(train, str(tmp_path / "train"), 4)
    write_csv_shards(test, str(tmp_path / "test"), 2)
    ddf = daskml_scale.read_csv(str(tmp_path / "train" / "*.csv"))
    pre = Preprocessor(target="late", **FEATURES).fit(ddf)
    assert pre.task_ == "classification"
    model = small_model(pre.n_features_, output="sigmoid")
    history = daskml_scale.fit(model, ddf, preprocessor=pre, epochs=3, batch_size=64, seed=0, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    url = daskml_scale.save_bundle(model, pre, str(tmp_path / "late.bundle"))
    bundle = daskml_scale.load_bundle(url)
    assert bundle.task == "classification" and bundle.output_names == ["proba_0", "proba_1", "label"]

    report = daskml_scale.predict_files(url, str(tmp_path / "test"), str(tmp_path / "out"), keep="id", client=client)
    assert report.ok, str(report)
    out = pd.concat([pd.read_csv(tmp_path / "out" / f"part-00{i}.csv") for i in range(2)], ignore_index=True)
    assert list(out.columns) == ["id", "proba_0", "proba_1", "label"]
    assert out["id"].tolist() == test["id"].tolist()
    # the probability is the sigmoid output of the model, the label the more probable class
    X, y = pre.transform(test)
    p = np.asarray(model(X, training=False))[:, 0]
    np.testing.assert_allclose(out["proba_1"].to_numpy(), p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["proba_0"] + out["proba_1"], 1.0, atol=1e-6)
    assert out["label"].tolist() == np.where(p > 0.5, 1, 0).tolist()
    # and it has learned something: better than always answering the majority class
    accuracy = float((out["label"].to_numpy() == y).mean())
    assert accuracy > max(y.mean(), 1 - y.mean()) + 0.05, accuracy


def test_a_binary_target_needs_a_probability_output():
    df = flights().iloc[:2000].dropna(subset=["arr_delay"])
    df = df.assign(late=(df["arr_delay"] > 15).astype("int64"))
    pre = Preprocessor(target="late", **FEATURES).fit(df)
    with pytest.raises(BundleError, match="sigmoid") as err:
        check_model(small_model(pre.n_features_, output="linear"), pre)
    assert "task='regression'" in str(err.value) and "task='auto'" in str(err.value)
    task, names, width = check_model(small_model(pre.n_features_, output="sigmoid"), pre)
    assert (task, names, width) == ("classification", ["proba_0", "proba_1", "label"], 1)
