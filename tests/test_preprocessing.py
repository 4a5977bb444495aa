from __future__ import annotations

import json

import dask
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform, write_csv_shards
from daskml_scale.exceptions import MissingColumnError, NonFiniteValueError, NotFittedError


def make_pre(**kw):
    return daskml_scale.Preprocessor(
        target="log_price", numeric=DIAMONDS_NUMERIC + ["volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=diamonds_transform, **kw,
    )


@pytest.fixture(scope="module")
def diamond_shards(tmp_path_factory):
    df = diamonds().iloc[:6000]
    d = tmp_path_factory.mktemp("diamonds")
    write_csv_shards(df, str(d), 4)
    return d, df


def test_partitionwise_transform_equals_pandas_transform(diamond_shards, client):
    d, _ = diamond_shards
    ddf = daskml_scale.read_csv(str(d / "*.csv"), blocksize=50_000)
    assert ddf.npartitions > 4
    pre = make_pre().fit(ddf)
    # on the workers, partition by partition
    parts = [dask.delayed(pre.transform)(p) for p in ddf.to_delayed()]
    results = dask.compute(*parts)
    X_parts = np.concatenate([r[0] for r in results])
    y_parts = np.concatenate([r[1] for r in results])
    # one pandas frame in this process, statistics fitted in pandas too
    whole = ddf.compute()
    X, y = pre.transform(whole)
    np.testing.assert_array_equal(X_parts, X)
    np.testing.assert_array_equal(y_parts, y)
    pre_pd = make_pre().fit(whole)
    for col in pre.numeric:
        assert pre.means_[col] == pytest.approx(pre_pd.means_[col], rel=1e-12)
        assert pre.scales_[col] == pytest.approx(pre_pd.scales_[col], rel=1e-12)
    assert pre.categories_ == pre_pd.categories_
    # standardization is right
    np.testing.assert_allclose(X[:, 0].mean(), 0, atol=1e-5)
    np.testing.assert_allclose(X[:, 0].std(), 1, atol=1e-4)
    assert X.dtype == np.float32 and y.dtype == np.float32
    assert pre.feature_names_[: len(pre.numeric)] == pre.numeric
    assert "cut=Ideal" in pre.feature_names_
    assert X.shape[1] == len(pre.feature_names_) == 7 + 5 + 7 + 8


def test_fit_is_one_pass(diamond_shards, client):
    d, _ = diamond_shards
    ddf = daskml_scale.read_csv(str(d / "*.csv"))
    calls = []

    def counting_get(dsk, keys, **kwargs):
        calls.append(keys)
        return client.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=counting_get):
        make_pre().fit(ddf)
    assert len(calls) == 1


def test_no_target_at_prediction_time_and_unseen_category(diamond_shards, client):
    d, df = diamond_shards
    pre = make_pre().fit(daskml_scale.read_csv(str(d / "*.csv")))
    rows = df.drop(columns=["price"]).iloc[:3].copy()
    rows.loc[rows.index[0], "cut"] = "Flawless-but-unseen"
    rows.loc[rows.index[1], "color"] = None
    X, y = pre.transform(rows)
    assert y is None
    cut_cols = [i for i, n in enumerate(pre.feature_names_) if n.startswith("cut=")]
    assert X[0, cut_cols].sum() == 0  # unseen: all zeros
    color_cols = [i for i, n in enumerate(pre.feature_names_) if n.startswith("color=")]
    assert X[1, color_cols].sum() == 0  # missing: all zeros
    assert X[2, cut_cols].sum() == 1


def test_missing_numbers_are_imputed_with_the_mean():
    df = pd.DataFrame({"a": [1.0, np.nan, 3.0], "t": [0.0, 1.0, 2.0]})
    pre = daskml_scale.Preprocessor(target="t", numeric=["a"]).fit(df)
    assert pre.means_["a"] == 2.0
    X, _ = pre.transform(df)
    assert X[1, 0] == 0.0  # imputed with the mean, then standardized


def test_json_round_trip_is_exact(diamond_shards):
    _, df = diamond_shards
    pre = make_pre().fit(df)
    text = pre.to_json()
    json.loads(text)  # plain JSON
    back = daskml_scale.Preprocessor.from_json(text)
    assert back == pre
    assert back.transform_fn is diamonds_transform  # stored by reference, imported back
    X1, y1 = pre.transform(df.iloc[:100])
    X2, y2 = back.transform(df.iloc[:100])
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)


def test_lambda_transform_must_be_given_again():
    df = pd.DataFrame({"a": [1.0, 2.0], "t": [1.0, 2.0]})
    pre = daskml_scale.Preprocessor(target="t", numeric=["b"], transform=lambda d: d.assign(b=d.a * 2)).fit(df)
    back = daskml_scale.Preprocessor.from_json(pre.to_json())
    with pytest.raises(NotFittedError, match="Pass it again"):
        back.transform(df)
    again = daskml_scale.Preprocessor.from_json(pre.to_json(), transform=lambda d: d.assign(b=d.a * 2))
    np.testing.assert_array_equal(again.transform(df)[0], pre.transform(df)[0])


def test_classification_target():
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "label": ["cat", "dog", "cat", "bird"]})
    pre = daskml_scale.Preprocessor(target="label", numeric=["a"]).fit(df)
    assert pre.classes_ == ["bird", "cat", "dog"]
    _, y = pre.transform(df)
    assert y.tolist() == [1, 2, 1, 0]


# ------------------------------------------------------------------ bad input
def test_missing_column_is_named():
    pre = daskml_scale.Preprocessor(target="t", numeric=["a", "b"]).fit(pd.DataFrame({"a": [1.0], "b": [2.0], "t": [0.0]}))
    with pytest.raises(MissingColumnError) as err:
        pre.transform(pd.DataFrame({"a": [1.0]}))
    assert err.value.column == "b"


def test_inf_in_feature_names_file_and_line(tmp_path, client):
    (tmp_path / "1.csv").write_text("a,t\n1.5,0\n2,1\n")
    (tmp_path / "2.csv").write_text("a,t\n1,0\ninf,1\n")
    ddf = daskml_scale.read_csv(str(tmp_path / "*.csv"), provenance=True)
    with pytest.raises(NonFiniteValueError) as err:
        daskml_scale.Preprocessor(target="t", numeric=["a"]).fit(ddf)
    assert err.value.path == str(tmp_path / "2.csv") and err.value.line == 3 and err.value.column == "a"


def test_nan_policy_error(tmp_path, client):
    (tmp_path / "1.csv").write_text("a,t\n1,0\n,1\n")
    ddf = daskml_scale.read_csv(str(tmp_path / "1.csv"), provenance=True)
    with pytest.raises(NonFiniteValueError) as err:
        daskml_scale.Preprocessor(target="t", numeric=["a"], missing="error").fit(ddf)
    assert err.value.line == 3 and err.value.column == "a"


def test_not_fitted():
    with pytest.raises(NotFittedError):
        daskml_scale.Preprocessor(numeric=["a"]).transform(pd.DataFrame({"a": [1.0]}))
