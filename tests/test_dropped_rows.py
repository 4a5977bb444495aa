"""A transform that drops rows at prediction time: ``on_dropped="keep" | "omit" | "error"``.

The transform is what a user writes for the flights table: ``df.dropna(subset=["dep_delay",
"air_time"])`` drops the cancelled flights. Every check goes row by row against the input:
each input row once, in input order, with the single-process prediction of that row, or an
empty cell where the transform dropped it.
"""

from __future__ import annotations

import asyncio
import io
import os

import dask.dataframe as dd
import keras
import numpy as np
import pandas as pd
import pytest

from daskml_scale import ArgumentError, DataError, Preprocessor, load_bundle, predict, predict_files, save_bundle
from daskml_scale.datasets import flights, write_csv_shards
from daskml_scale.dropped_rows import DROPPED_REASON, apply_on_dropped, kept_rows

NUMERIC = ["month", "day", "sched_dep_time", "dep_delay", "distance", "air_time"]
CATEGORICAL = ["carrier", "origin"]
ROWS = 12_000
N_SHARDS = 4


def drop_cancelled(df: pd.DataFrame) -> pd.DataFrame:
    """A cancelled flight has no departure delay and no air time: nothing to predict from."""
    return df.dropna(subset=["dep_delay", "air_time"])


def drop_and_shuffle(df: pd.DataFrame) -> pd.DataFrame:
    """Drops the same rows, and returns the others in another order."""
    return drop_cancelled(df).sample(frac=1.0, random_state=0)


def repeat_rows(df: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([df, df.iloc[:3]])


def reset_index(df: pd.DataFrame) -> pd.DataFrame:
    return drop_cancelled(df).reset_index(drop=True)


def _train(target: str, numeric: list[str], transform=drop_cancelled):
    keras.utils.set_random_seed(0)
    df = flights().iloc[:ROWS]
    pre = Preprocessor(target=target, numeric=numeric, categorical=[c for c in CATEGORICAL if c != target],
                       transform=transform).fit(df)
    X, y = pre.transform(drop_cancelled(df))
    classes = pre.classes_
    out = keras.layers.Dense(len(classes), activation="softmax") if classes else keras.layers.Dense(1)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(8, activation="relu"), out])
    model.compile("adam", "sparse_categorical_crossentropy" if classes else "mse")
    model.fit(X, y, epochs=1, batch_size=512, steps_per_epoch=4, verbose=0)
    return model, pre, df


@pytest.fixture(scope="module")
def regressor(tmp_path_factory):
    model, pre, df = _train("arr_delay", NUMERIC)
    path = save_bundle(model, pre, str(tmp_path_factory.mktemp("model") / "delay.bundle"))
    return model, pre, df, path


def expected(model, pre, df: pd.DataFrame) -> np.ndarray:
    """Single-process ``model(X)`` per input row; NaN for the rows the transform drops."""
    kept = drop_cancelled(df)
    X, _ = pre.transform(kept)
    out = np.full((len(df), int(model.outputs[0].shape[-1])), np.nan, dtype=np.float32)
    out[df.index.get_indexer(kept.index)] = np.asarray(model(X, training=False))
    return out


def cancelled(df: pd.DataFrame) -> np.ndarray:
    return (df["dep_delay"].isna() | df["air_time"].isna()).to_numpy()


def check_rows(out: pd.DataFrame, df: pd.DataFrame, ref: np.ndarray, on_dropped: str) -> None:
    """``out`` against the input ``df`` row by row under the policy."""
    gone = cancelled(df)
    assert gone.sum() > 20  # the data has cancelled flights: the check is not vacuous
    if on_dropped == "omit":
        np.testing.assert_array_equal(out["id"].to_numpy(), df["id"].to_numpy()[~gone])
        np.testing.assert_allclose(out["prediction"].to_numpy(), ref[~gone, 0], atol=1e-5)
        return
    np.testing.assert_array_equal(out["id"].to_numpy(), df["id"].to_numpy())  # every input row, in order
    got = out["prediction"].to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), gone)  # empty exactly where the transform dropped the row
    np.testing.assert_allclose(got[~gone], ref[~gone, 0], atol=1e-5)


# ------------------------------------------------------------------------ matching
def test_kept_rows_matches_by_label_and_names_what_cannot_match():
    before = pd.Index([10, 11, 12, 13])
    assert kept_rows(before, before) == (None, None)
    assert kept_rows(pd.Index([1, 1, 2]), pd.Index([1, 1, 2])) == (None, None)  # unchanged: duplicates are fine
    order, rows = kept_rows(before, pd.Index([13, 10, 12]))
    assert order.tolist() == [1, 2, 0] and rows.tolist() == [0, 2, 3]
    order, rows = kept_rows(before, pd.Index([11, 10, 12, 13]))  # reordered, nothing dropped
    assert order.tolist() == [1, 0, 2, 3] and rows is None
    with pytest.raises(DataError, match=r"labels 10 more than once"):
        kept_rows(before, pd.Index([10, 10, 11]))
    with pytest.raises(DataError, match=r"not in the input.*reset_index"):
        kept_rows(before, pd.Index([0, 1]))
    with pytest.raises(DataError, match=r"unique index.*reset_index\(drop=True\)"):
        kept_rows(pd.Index([1, 1, 2]), pd.Index([1, 2]))


def test_apply_on_dropped_fills_with_empty_cells_of_nullable_dtypes():
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0]}, index=[5, 6, 7])
    pred = pd.DataFrame(
        {"p": np.array([0.5, 0.7], dtype="float32"), "n": np.array([1, 2]), "label": pd.array(["a", "b"], dtype="str")},
        index=[5, 7],
    )
    rows_df, out = apply_on_dropped(df, pred, np.array([0, 2]), "keep")
    assert rows_df is df and out.index.equals(df.index)
    assert out.dtypes.to_dict() == {"p": np.dtype("float32"), "n": pd.Int64Dtype(), "label": pred["label"].dtype}
    assert out["p"].isna().tolist() == [False, True, False] and out["n"].isna().tolist() == [False, True, False]
    assert out["label"].isna().tolist() == [False, True, False] and out["label"].iloc[2] == "b"
    # nothing dropped: the same dtypes, so that every partition matches the meta
    assert apply_on_dropped(df, pred.iloc[:0], None, "keep")[1].dtypes.to_dict() == out.dtypes.to_dict()
    rows_df, out = apply_on_dropped(df, pred, np.array([0, 2]), "omit")
    assert rows_df.index.tolist() == [5, 7] and out["n"].dtype == np.int64
    with pytest.raises(DataError, match=r"3 rows in, 2 out; the first is row 1 \(index 6\).*on_dropped='keep'"):
        apply_on_dropped(df, pred, np.array([0, 2]), "error")


def test_bundle_predict_frame_under_each_policy(regressor):
    model, pre, df, path = regressor
    bundle = load_bundle(path)
    rows = df.iloc[:3000]
    ref = expected(model, pre, rows)
    out = bundle.predict_frame(rows)  # default: keep
    assert out.index.equals(rows.index)
    check_rows(out.assign(id=rows["id"]), rows, ref, "keep")
    omitted = bundle.predict_frame(rows, on_dropped="omit")
    assert omitted.index.equals(rows.index[~cancelled(rows)])
    with pytest.raises(DataError, match="on_dropped='error'"):
        bundle.predict_frame(rows, on_dropped="error")
    with pytest.raises(ArgumentError, match="Received: on_dropped='drop'"):
        bundle.predict_frame(rows, on_dropped="drop")
    # a transform that also reorders: matched by label, answered in input order
    shuffled = load_bundle(path, transform=drop_and_shuffle)
    pd.testing.assert_frame_equal(shuffled.predict_frame(rows), out)
    with pytest.raises(DataError, match="more than once"):
        load_bundle(path, transform=repeat_rows).predict_frame(rows)
    with pytest.raises(DataError, match="not in the input"):
        load_bundle(path, transform=reset_index).predict_frame(rows.iloc[100:])


# ------------------------------------------------------------------------ predict_files
@pytest.mark.parametrize("on_dropped", ["keep", "omit", "error"])
def test_predict_files_on_flights_with_cancelled_flights(client, regressor, tmp_path, on_dropped):
    model, pre, df, path = regressor
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    write_csv_shards(df, str(in_dir), N_SHARDS)  # the raw table: arr_delay and the cancelled flights included
    ref = expected(model, pre, df)
    report = predict_files(path, str(in_dir), str(out_dir), keep="id", client=client, on_dropped=on_dropped)
    shards = [pd.read_csv(in_dir / f"part-{i:03d}.csv") for i in range(N_SHARDS)]
    if on_dropped == "error":
        assert len(report.failed) == N_SHARDS and not report.done, str(report)
        error = report.failed[0]["error"]
        assert "on_dropped='error'" in error and "part-000.csv, line " in error, error
        first = int(np.flatnonzero(cancelled(shards[0]))[0])
        assert f"line {first + 2}" in error  # the first cancelled flight of the file (after the header line)
        assert not out_dir.exists() or not os.listdir(out_dir)
        return
    assert report.ok and len(report.done) == N_SHARDS, str(report)
    assert [e["dropped"] for e in report.done] == [int(cancelled(s).sum()) for s in shards]
    assert report.dropped == int(cancelled(df).sum())
    if on_dropped == "keep":
        assert report.rows == len(df) and "dropped by the transform, written with empty predictions" in str(report)
    else:
        assert report.rows == len(df) - report.dropped and "left out" in str(report)
    assert list(report.to_frame()["dropped"]) == [e["dropped"] for e in report.done]
    out = pd.concat([pd.read_csv(out_dir / f"part-{i:03d}.csv") for i in range(N_SHARDS)], ignore_index=True)
    assert list(out.columns) == ["id", "prediction"]
    check_rows(out, df, ref, on_dropped)


def test_predict_files_default_keeps_every_row_in_parquet(client, regressor, tmp_path):
    model, pre, df, path = regressor
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(df)), 2)):
        df.iloc[part].to_parquet(in_dir / f"part-{i:03d}.parquet", index=False)
    report = predict_files(path, str(in_dir), str(out_dir), format="parquet", keep="all", client=client)
    assert report.ok and report.dropped == int(cancelled(df).sum()), str(report)
    out = pd.concat([pd.read_parquet(out_dir / f"part-{i:03d}.parquet") for i in range(2)], ignore_index=True)
    assert list(out.columns) == [*df.columns, "prediction"]
    pd.testing.assert_frame_equal(out[list(df.columns)], df.reset_index(drop=True), check_dtype=False)
    check_rows(out, df, expected(model, pre, df), "keep")


# ------------------------------------------------------------------------ predict()
@pytest.mark.parametrize("on_dropped", ["keep", "omit"])
def test_predict_dask_dataframe_under_each_policy(client, regressor, on_dropped):
    model, pre, df, path = regressor
    rows = df.sample(6000, random_state=1)  # a shuffled index: rows are matched by label, not position
    ddf = dd.from_pandas(rows, npartitions=5, sort=False)
    out = predict(path, ddf, keep="id", on_dropped=on_dropped)
    res = out.compute()
    assert res.dtypes.to_dict() == out._meta.dtypes.to_dict()  # the meta stays honest
    assert out._meta["prediction"].dtype == np.float32
    kept = ~cancelled(rows)
    assert res.index.equals(rows.index if on_dropped == "keep" else rows.index[kept])
    check_rows(res, rows, expected(model, pre, rows), on_dropped)


def test_predict_dask_dataframe_error_policy_and_bad_arguments(client, regressor):
    _, _, df, path = regressor
    ddf = dd.from_pandas(df.iloc[:4000], npartitions=2)
    with pytest.raises(DataError, match=r"on_dropped=.error.*2000 rows in"):
        predict(path, ddf, on_dropped="error").compute()
    with pytest.raises(ArgumentError, match="on_dropped"):
        predict(path, ddf, on_dropped="skip")


def test_predict_classification_labels_are_empty_where_dropped(client, tmp_path):
    model, pre, df = _train("origin", NUMERIC)
    path = save_bundle(model, pre, str(tmp_path / "origin.bundle"))
    rows = df.iloc[:5000]
    out = predict(path, dd.from_pandas(rows, npartitions=3), keep="id")
    res = out.compute()
    assert res.dtypes.to_dict() == out._meta.dtypes.to_dict()
    names = [f"proba_{c}" for c in pre.classes_]
    assert list(res.columns) == ["id", *names, "label"]
    gone = cancelled(rows)
    assert res["label"].isna().to_numpy().tolist() == gone.tolist()
    assert res[names].isna().all(axis=1).to_numpy().tolist() == gone.tolist()
    ref = expected(model, pre, rows)
    np.testing.assert_allclose(res[names].to_numpy(dtype=np.float64)[~gone], ref[~gone], atol=1e-5)
    assert res["label"][~gone].tolist() == [pre.classes_[i] for i in ref[~gone].argmax(axis=1)]


# ------------------------------------------------------------------------ REST
def _serve(app, call):
    from tests.test_serving import served

    async def go():
        async with served(app) as c:
            return await call(c)

    return asyncio.run(go())


def test_rest_answers_null_with_the_reason_for_dropped_rows(regressor):
    from daskml_scale.serving import create_app

    model, pre, df, path = regressor
    rows = df.iloc[:1000]
    raw = rows.drop(columns=["arr_delay"])  # what a client sends: no target, null where a value is missing
    records = raw.astype(object).where(raw.notna(), None).to_dict("records")
    gone = cancelled(rows)
    assert gone.sum() >= 10
    ref = expected(model, pre, rows)[:, 0]

    async def call(c):
        one = await c.post("/predict?id=id", json=records)
        csv = await c.post("/predict?id=id", content=rows.to_csv(index=False), headers={"content-type": "text/csv"})
        return one, csv

    one, csv = _serve(create_app(path), call)
    assert one.status_code == 200, one.text
    out = one.json()
    assert [o["id"] for o in out] == rows["id"].tolist()  # every row, in order
    for o, g, r in zip(out, gone, ref):
        if g:
            assert o == {"id": o["id"], "prediction": None, "dropped": True, "reason": DROPPED_REASON}
        else:
            assert set(o) == {"id", "prediction"} and o["prediction"] == pytest.approx(float(r), abs=1e-4)
    assert csv.status_code == 200, csv.text
    back = pd.read_csv(io.StringIO(csv.text))
    assert list(back.columns) == ["id", "prediction", "dropped"]
    assert back["dropped"].tolist() == gone.tolist() and back["prediction"].isna().tolist() == gone.tolist()

    async def omit_and_error(c):
        return await c.post("/predict?id=id", json=records)

    omitted = _serve(create_app(path, on_dropped="omit"), omit_and_error).json()
    assert [o["id"] for o in omitted] == rows["id"][~gone].tolist()
    refused = _serve(create_app(path, on_dropped="error"), omit_and_error)
    assert refused.status_code == 422 and "on_dropped='error'" in refused.json()["error"], refused.text


# ------------------------------------------------------------------------ CLI
def test_cli_predict_on_dropped_and_serve_flag(client, regressor, tmp_path, capsys):
    from daskml_scale.cli import CLIError, build_parser, main

    _, _, df, path = regressor
    write_csv_shards(df, str(tmp_path / "in"), 2)
    n_gone = int(cancelled(df).sum())
    common = ["--bundle", path, "--input", str(tmp_path / "in"), "--scheduler", client.scheduler.address]
    rc = main(["predict", *common, "--output", str(tmp_path / "kept")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"2 done ({len(df):,} rows; {n_gone:,} rows dropped by the transform, written with empty predictions)" in out
    kept = pd.concat([pd.read_csv(tmp_path / "kept" / f"part-{i:03d}.csv") for i in range(2)])
    assert len(kept) == len(df) and kept["prediction"].isna().sum() == n_gone
    rc = main(["predict", *common, "--output", str(tmp_path / "omitted"), "--on-dropped", "omit"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"({len(df) - n_gone:,} rows; {n_gone:,} rows dropped by the transform, left out)" in out
    rc = main(["predict", *common, "--output", str(tmp_path / "refused"), "--on-dropped", "error"])
    out, err = capsys.readouterr()
    assert rc == 1 and "on_dropped='error'" in err
    assert build_parser().parse_args(["serve", path, "--on-dropped", "omit"]).on_dropped == "omit"
    with pytest.raises(CLIError, match="--on-dropped: invalid choice: 'drop'"):
        build_parser().parse_args(["serve", path, "--on-dropped", "drop"])


def test_jobs_take_on_dropped_and_check_it():
    from daskml_scale.serving.inputs import RequestError
    from daskml_scale.serving.jobs import JobManager

    spec = JobManager.parse_request({"input": "in/*.csv", "output": "out/", "on_dropped": "omit"})
    assert spec["on_dropped"] == "omit"
    assert JobManager.parse_request({"input": "in/*.csv", "output": "out/"})["on_dropped"] is None  # the server's
    with pytest.raises(RequestError, match="on_dropped") as err:
        JobManager.parse_request({"input": "in/*.csv", "output": "out/", "on_dropped": "drop"})
    assert err.value.status == 422 and err.value.field == "on_dropped"
    with pytest.raises(ArgumentError, match="on_dropped"):
        from daskml_scale.serving import ServeOptions

        ServeOptions(on_dropped="drop")
