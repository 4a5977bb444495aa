"""predict() over partitions and predict_files() file by file, on real clusters."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale import DataError, PredictReport, load_bundle, predict, predict_files, save_bundle
from daskml_scale.datasets import diamonds_transform, write_csv_shards
from daskml_scale.predict import cache_info
from daskml_scale.io.writers import frame_to_csv, write_bytes_atomic, write_frame_atomic
from tests.test_bundle import reference, train_classifier, train_regressor

N_SHARDS = 6


def slow_transform(df: pd.DataFrame) -> pd.DataFrame:
    """diamonds_transform, slowed down so that a job lasts long enough to kill a worker in it."""
    time.sleep(0.4)
    return diamonds_transform(df)


@pytest.fixture(scope="module")
def trained():
    return train_regressor()


@pytest.fixture(scope="module")
def bundle_path(trained, tmp_path_factory):
    model, pre, _ = trained
    return save_bundle(model, pre, str(tmp_path_factory.mktemp("model") / "price.bundle"))


@pytest.fixture(scope="module")
def shards(trained, tmp_path_factory):
    """The diamonds table in N_SHARDS CSV files, and the single-process reference."""
    model, pre, df = trained
    d = tmp_path_factory.mktemp("in")
    write_csv_shards(df, str(d), N_SHARDS)
    ref = reference(model, pre, df)[:, 0]
    return str(d), df, ref


def _read_outputs(directory: str, n: int = N_SHARDS, fmt: str = "csv", storage_options=None) -> pd.DataFrame:
    parts = []
    for i in range(n):
        path = f"{directory}/part-{i:03d}.{fmt}"
        if fmt == "csv":
            parts.append(pd.read_csv(path, storage_options=storage_options))
        else:
            parts.append(pd.read_parquet(path, storage_options=storage_options))
    return pd.concat(parts, ignore_index=True)


def _check_exact(out: pd.DataFrame, df: pd.DataFrame, ref: np.ndarray) -> None:
    """Every input id once, in input order, with the single-process prediction."""
    np.testing.assert_array_equal(out["id"].to_numpy(), df["id"].to_numpy())
    np.testing.assert_allclose(out["prediction"].to_numpy(), ref, atol=1e-5)


# --------------------------------------------------------------------- predict()
def test_predict_matches_model_keeps_index_and_order(client, trained, bundle_path, shards):
    model, pre, df = trained
    directory, _, ref = shards
    ddf = daskml_scale.read_csv(f"{directory}/*.csv", blocksize=200_000)
    assert ddf.npartitions > N_SHARDS  # several partitions per file
    bundle = load_bundle(bundle_path)
    out = predict(bundle, ddf, keep="id")
    assert list(out.columns) == ["id", "prediction"]
    res = out.compute()
    assert res.dtypes.to_dict() == out._meta.dtypes.to_dict()  # explicit meta is honest
    assert res.index.equals(ddf.compute().index)
    _check_exact(res, df, ref)
    # the model is loaded once per worker, not once per partition
    res2 = predict(bundle, ddf).compute()
    np.testing.assert_array_equal(res2["prediction"].to_numpy(), res["prediction"].to_numpy())
    loads = [info["loads"].get(bundle.content_hash, 0) for info in client.run(cache_info).values()]
    assert max(loads) == 1 and sum(loads) >= 1, loads


def test_predict_shuffled_index_and_keep_variants(client, trained, bundle_path):
    model, pre, df = trained
    rows = df.sample(6000, random_state=3)  # a shuffled, non-monotonic index
    ddf = dd.from_pandas(rows, npartitions=4, sort=False)
    ref = reference(model, pre, rows)[:, 0]
    out = predict(bundle_path, ddf, keep="all").compute()  # from a bundle URL
    assert list(out.columns) == list(rows.columns) + ["prediction"]
    assert out.index.equals(rows.index)
    pd.testing.assert_frame_equal(out[list(rows.columns)], rows, check_dtype=False)
    np.testing.assert_allclose(out["prediction"].to_numpy(), ref, atol=1e-5)
    # a live Keras model with its preprocessor
    out2 = predict(model, ddf, preprocessor=pre, keep=["id", "carat"]).compute()
    assert list(out2.columns) == ["id", "carat", "prediction"]
    np.testing.assert_allclose(out2["prediction"].to_numpy(), ref, atol=1e-5)
    only = predict(bundle_path, ddf).compute()
    assert list(only.columns) == ["prediction"]
    with pytest.raises(DataError, match="not_a_column"):
        predict(bundle_path, ddf, keep=["id", "not_a_column"])
    with pytest.raises(ValueError, match="preprocessor"):
        predict(model, ddf)


def test_predict_classification(client, tmp_path):
    model, pre, df = train_classifier()
    path = save_bundle(model, pre, str(tmp_path / "cut.bundle"))
    rows = df.iloc[:5000]
    out = predict(path, dd.from_pandas(rows, npartitions=3), keep="id").compute()
    names = [f"proba_{c}" for c in pre.classes_]
    assert list(out.columns) == ["id", *names, "label"]
    ref = reference(model, pre, rows)
    np.testing.assert_allclose(out[names].to_numpy(), ref, atol=1e-5)
    assert out["label"].tolist() == [pre.classes_[i] for i in ref.argmax(axis=1)]


def test_predict_dask_array_of_features(client, trained, bundle_path):
    import dask.array as da

    model, pre, df = trained
    X, _ = pre.transform(df.iloc[:7000], with_target=False)
    Xd = da.from_array(X, chunks=(1500, 10))  # column chunks too: rechunked to whole rows
    ref = model.predict(X, verbose=0)
    out = predict(model, Xd)  # a live model, no preprocessor: the array holds features
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.compute(), ref, atol=1e-5)
    np.testing.assert_allclose(predict(load_bundle(bundle_path), Xd.astype("float64")).compute(), ref, atol=1e-5)
    # other inputs, other keys: held results are never mistaken for these
    held = out.persist()
    np.testing.assert_allclose(predict(model, Xd[::-1]).compute(), ref[::-1], atol=1e-5)
    del held
    # a live model: the same bytes while it is unchanged (workers load it once), new ones after training
    import keras

    live = keras.models.clone_model(model)
    live.set_weights([w * 0.9 for w in model.get_weights()])  # not the bytes of `model` above, made the same second
    def loaded() -> set:
        return {key for info in client.run(cache_info).values() for key in info["loads"]}

    before = loaded()
    first = predict(live, Xd).compute()
    time.sleep(1.1)  # a bundle records when it was made (in seconds): a new one would differ
    predict(live, Xd).compute()
    assert len(loaded() - before) == 1
    np.testing.assert_allclose(first, live.predict(X, verbose=0), atol=1e-5)
    live.set_weights([w * 0.5 for w in live.get_weights()])
    np.testing.assert_allclose(predict(live, Xd).compute(), live.predict(X, verbose=0), atol=1e-5)
    assert not np.allclose(predict(live, Xd).compute(), first)
    with pytest.raises(ValueError, match="27 feature columns"):
        predict(model, Xd[:, :5])
    with pytest.raises(ValueError, match="preprocessor=None"):
        predict(model, Xd, preprocessor=pre)
    with pytest.raises(ValueError, match="keep=None"):
        predict(model, Xd, keep="id")


# --------------------------------------------------------------------- predict_files()
def test_predict_files_local_rerun_and_redo(client, bundle_path, shards, tmp_path):
    directory, df, ref = shards
    out_dir = str(tmp_path / "out")
    report = predict_files(bundle_path, directory, out_dir, keep="id", client=client)
    assert isinstance(report, PredictReport) and report.ok
    assert len(report.done) == N_SHARDS and not report.skipped
    assert report.rows == len(df)
    assert sorted(os.listdir(out_dir)) == [f"part-{i:03d}.csv" for i in range(N_SHARDS)]  # no temp files
    _check_exact(_read_outputs(out_dir), df, ref)

    # a rerun skips everything; a deleted output is redone, alone
    kept = f"{out_dir}/part-000.csv"
    mtime = os.stat(kept).st_mtime_ns
    os.remove(f"{out_dir}/part-002.csv")
    again = predict_files(bundle_path, f"{directory}/*.csv", out_dir, keep="id", client=client)
    assert [e["output"] for e in again.done] == [f"{out_dir}/part-002.csv"]
    assert again.done[0]["rows"] == len(pd.read_csv(f"{directory}/part-002.csv"))
    assert len(again.skipped) == N_SHARDS - 1 and not again.failed
    assert os.stat(kept).st_mtime_ns == mtime
    _check_exact(_read_outputs(out_dir), df, ref)
    assert len(predict_files(bundle_path, directory, out_dir, client=client, overwrite=True).done) == N_SHARDS


def test_predict_files_parquet(client, bundle_path, shards, tmp_path):
    directory, df, ref = shards
    out_dir = str(tmp_path / "pq")
    report = predict_files(bundle_path, directory, out_dir, format="parquet", keep="all", client=client)
    assert report.ok and len(report.done) == N_SHARDS
    out = _read_outputs(out_dir, fmt="parquet")
    assert list(out.columns) == list(df.columns) + ["prediction"]
    _check_exact(out, df, ref)


def test_predict_files_s3_in_and_out(client, trained, s3):
    model, pre, df = trained
    opts = s3.storage_options
    rows = df.iloc[:12000]
    write_csv_shards(rows, s3.url("in"), 3, storage_options=opts)
    bundle_url = save_bundle(model, pre, s3.url("models", "price.bundle"), storage_options=opts)
    report = predict_files(bundle_url, s3.url("in"), s3.url("out"), keep="id", storage_options=opts, client=client)
    assert report.ok and len(report.done) == 3, str(report)
    assert report.done[0]["output"] == s3.url("out", "part-000.csv")
    _check_exact(_read_outputs(s3.url("out"), n=3, storage_options=opts), rows, reference(model, pre, rows)[:, 0])
    again = predict_files(bundle_url, s3.url("in"), s3.url("out"), storage_options=opts, client=client)
    assert len(again.skipped) == 3 and not again.done


def test_a_file_with_bad_rows_fails_alone(client, bundle_path, shards, tmp_path):
    directory, df, ref = shards
    bad_in = tmp_path / "in"
    bad_in.mkdir()
    for name in sorted(os.listdir(directory)):
        (bad_in / name).write_bytes(open(f"{directory}/{name}", "rb").read())
    lines = (bad_in / "part-001.csv").read_text().splitlines(keepends=True)
    fields = lines[50].split(",")
    fields[1] = "not-a-number"  # the carat column (after id)
    lines[50] = ",".join(fields)
    (bad_in / "part-001.csv").write_text("".join(lines))
    out_dir = tmp_path / "out"
    report = predict_files(bundle_path, str(bad_in), str(out_dir), keep="id", client=client)
    assert [e["input"] for e in report.failed] == [str(bad_in / "part-001.csv")]
    error = report.failed[0]["error"]
    assert "part-001.csv" in error and "line 51" in error and "carat" in error, error
    assert len(report.done) == N_SHARDS - 1
    assert sorted(os.listdir(out_dir)) == [f"part-{i:03d}.csv" for i in range(N_SHARDS) if i != 1]
    assert "1 failed" in str(report)
    # the skip policy drops the row and writes the file
    report = predict_files(bundle_path, str(bad_in), str(out_dir), keep="id", on_bad_rows="skip", client=client)
    assert report.ok and [e["rows"] for e in report.done] == [len(pd.read_csv(f"{directory}/part-001.csv")) - 1]


@pytest.mark.slow
def test_worker_killed_mid_job_leaves_exact_outputs(own_client, trained, tmp_path):
    model, pre, df = trained
    slow = daskml_scale.Preprocessor(
        target="log_price", numeric=pre.numeric, categorical=pre.categorical, transform=slow_transform
    ).fit(df)
    path = save_bundle(model, slow, str(tmp_path / "slow.bundle"))
    n = 16
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    write_csv_shards(df, str(in_dir), n)
    result: dict[str, PredictReport] = {}
    job = threading.Thread(
        target=lambda: result.setdefault("r", predict_files(path, str(in_dir), str(out_dir), keep="id", client=own_client))
    )
    job.start()
    deadline = time.monotonic() + 120
    while not (out_dir.exists() and len([f for f in os.listdir(out_dir) if f.endswith(".csv")]) >= 2):
        assert time.monotonic() < deadline and job.is_alive(), "the job never started writing"
        time.sleep(0.05)
    pids = own_client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    written_at_kill = len([f for f in os.listdir(out_dir) if f.endswith(".csv")])
    job.join(timeout=300)
    assert not job.is_alive()
    assert written_at_kill < n  # the kill happened in the middle of the job
    report = result["r"]
    assert report.ok and len(report.done) == n, str(report)
    assert sorted(os.listdir(out_dir)) == [f"part-{i:03d}.csv" for i in range(n)]  # no temp files left
    out = _read_outputs(str(out_dir), n=n)
    assert out["id"].is_unique
    _check_exact(out, df, reference(model, slow, df)[:, 0])


# --------------------------------------------------------------------- writers
def test_csv_writer_round_trips_through_pandas():
    df = pd.DataFrame({
        "f": [0.1, 1 / 3, 1e-300, -2.5e17, np.nan, 123456789.123456789],
        "f32": np.array([0.1, 1 / 3, 1e-30, -2.5, np.nan, 7], dtype="float32"),
        "i": pd.array([1, None, 3, -4, 2**53, 0], dtype="Int64"),
        "s": pd.array(["a,b", 'say "hi"', "line\nbreak", "é€", None, " x "], dtype="str"),
        "b": [True, False, True, True, False, True],
    })
    buf = io.BytesIO()
    frame_to_csv(df, buf)
    back = pd.read_csv(io.BytesIO(buf.getvalue()), dtype={"i": "Int64", "s": "str"})
    np.testing.assert_array_equal(back["f"].to_numpy(), df["f"].to_numpy())  # exact, NaN in place
    np.testing.assert_array_equal(back["f32"].astype("float32").to_numpy(), df["f32"].to_numpy())
    pd.testing.assert_series_equal(back["i"], df["i"])
    assert back["s"].tolist()[:4] + back["s"].tolist()[5:] == ["a,b", 'say "hi"', "line\nbreak", "é€", " x "]
    assert back["s"].isna().tolist() == [False, False, False, False, True, False]
    assert back["b"].tolist() == df["b"].tolist()
    # a column pyarrow cannot convert falls back to pandas' writer
    mixed = pd.DataFrame({"m": [1, "x", 2.5]}, dtype=object)
    buf = io.BytesIO()
    frame_to_csv(mixed, buf)
    assert pd.read_csv(io.BytesIO(buf.getvalue()))["m"].astype(str).tolist() == ["1", "x", "2.5"]


def test_atomic_writers_local_and_s3(tmp_path, s3):
    df = pd.DataFrame({"a": [1.5, 2.5], "b": ["x", "y"]})
    target = tmp_path / "sub" / "t.csv"
    write_frame_atomic(df, str(target))
    pd.testing.assert_frame_equal(pd.read_csv(target), df, check_dtype=False)
    write_bytes_atomic(str(target), b"a,b\n")
    assert target.read_bytes() == b"a,b\n" and os.listdir(target.parent) == ["t.csv"]
    url = s3.url("w", "t.parquet")
    write_frame_atomic(df, url, format="parquet", storage_options=s3.storage_options)
    pd.testing.assert_frame_equal(pd.read_parquet(url, storage_options=s3.storage_options), df, check_dtype=False)
    with pytest.raises(ValueError, match="format"):
        write_frame_atomic(df, str(target), format="xlsx")
