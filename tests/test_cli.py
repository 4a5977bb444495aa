"""The ``daskml-scale`` command line, end to end on real components.

A scheduler and a worker as OS processes (``remote_cluster``), a loopback S3 server
(``s3``), real files; the CLI runs in-process through ``daskml_scale.cli.main`` and
once as ``python -m daskml_scale`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.cli import main, parse_storage_options
from daskml_scale.datasets import (
    DIAMONDS_CATEGORICAL,
    DIAMONDS_NUMERIC,
    FLIGHTS_CATEGORICAL,
    FLIGHTS_NUMERIC,
    diamonds,
    diamonds_transform,
    flights,
    write_csv_shards,
)

from .conftest import free_port

FEATURES = [
    "--numeric", *DIAMONDS_NUMERIC, "volume", "--categorical", *DIAMONDS_CATEGORICAL,
    "--target", "log_price",
]

MODEL_DEF = textwrap.dedent(
    """
    import numpy as np
    import keras

    def build_model(n_features):
        model = keras.Sequential([
            keras.Input((n_features,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ])
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse", metrics=["mae"])
        return model

    def my_transform(df):
        # a user's transform in a plain file: not importable by name on the workers
        out = df.copy()
        out["volume"] = out["x"] * out["y"] * out["z"]
        if "price" in out.columns:
            out["log_price"] = np.log(out["price"].astype("float64"))
        return out
    """
)


@pytest.fixture(scope="module")
def small_diamonds() -> pd.DataFrame:
    """3,000 real diamonds rows, shuffled."""
    return diamonds().sample(n=3000, random_state=7).reset_index(drop=True)


@pytest.fixture
def model_def(tmp_path: Path) -> Path:
    path = tmp_path / "model_def.py"
    path.write_text(MODEL_DEF)
    return path


@pytest.fixture(scope="module")
def local_bundle(tmp_path_factory, small_diamonds) -> str:
    """A small bundle made in-process with the public API (no cluster)."""
    import keras

    df = small_diamonds.iloc[:500]
    pre = daskml_scale.Preprocessor(
        target="log_price", numeric=DIAMONDS_NUMERIC + ["volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=diamonds_transform,
    ).fit(df)
    model = keras.Sequential([keras.Input((pre.n_features_,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    url = str(tmp_path_factory.mktemp("bundle") / "small.bundle")
    daskml_scale.save_bundle(model, pre, url, training_summary={"note": "made by the test"})
    return url


def _s3_args(s3) -> list[str]:
    so = s3.storage_options
    return [
        "--storage-option", f"key={so['key']}", "--storage-option", f"secret={so['secret']}",
        "--storage-option", f"client_kwargs.endpoint_url={so['client_kwargs']['endpoint_url']}",
        "--storage-option", f"client_kwargs.region_name={so['client_kwargs']['region_name']}",
    ]


def _one_line_error(err: str) -> str:
    """The error output must be exactly one line, with no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------ options
def test_storage_options_nest_and_parse_json():
    opts = parse_storage_options(
        ["key=abc", "anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9000",
         "client_kwargs.region_name=us-east-1", "config_kwargs.max_pool_connections=32", "token=\"12\""]
    )
    assert opts == {
        "key": "abc", "anon": False, "token": "12",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"},
        "config_kwargs": {"max_pool_connections": 32},
    }


# --------------------------------------------------------------- end to end on S3
@pytest.mark.slow
def test_train_predict_info_on_remote_cluster_and_s3(remote_cluster, s3, small_diamonds, model_def, capsys):
    train, test = small_diamonds.iloc[:2500], small_diamonds.iloc[2500:]
    write_csv_shards(train, s3.url("train"), 3, storage_options=s3.storage_options)
    write_csv_shards(test, s3.url("test"), 2, storage_options=s3.storage_options)
    common = ["--scheduler", remote_cluster.address, *_s3_args(s3)]
    bundle_url = s3.url("models", "price.bundle")

    rc = main([
        "train", "--data", s3.url("train", "*.csv"), *FEATURES,
        "--transform", "daskml_scale.datasets:diamonds_transform",
        "--model", f"{model_def}:build_model", "--strategy", "averaging", "--sync-every", "4",
        "--epochs", "1", "--batch-size", "64", "--validation", s3.url("test", "*.csv"),
        "--out", bundle_url, *common,
    ])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"bundle written to {bundle_url}" in out
    assert "val_mae" in out
    assert s3.filesystem().exists(bundle_url)

    # predict s3 -> s3, file by file
    rc = main(["predict", "--bundle", bundle_url, "--input", s3.url("test"), "--output", s3.url("pred"),
               "--keep", "id", *common])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "2 done (500 rows), 0 skipped, 0 failed" in out
    fs = s3.filesystem()
    outputs = sorted(fs.glob(s3.url("pred", "*.csv").removeprefix("s3://")))
    assert len(outputs) == 2
    pred = pd.concat([pd.read_csv(fs.open(p)) for p in outputs], ignore_index=True)
    assert list(pred.columns) == ["id", "prediction"]
    assert pred["id"].tolist() == test["id"].tolist()
    bundle = daskml_scale.load_bundle(bundle_url, storage_options=s3.storage_options)
    expected = bundle.predict_frame(test.reset_index(drop=True))["prediction"].to_numpy()
    np.testing.assert_allclose(pred["prediction"].to_numpy(), expected, rtol=1e-4, atol=1e-4)

    # a rerun skips what is done
    rc = main(["predict", "--bundle", bundle_url, "--input", s3.url("test"), "--output", s3.url("pred"), *common])
    out, _ = capsys.readouterr()
    assert rc == 0 and "0 done (0 rows), 2 skipped, 0 failed" in out

    # info, machine-readable and human-readable
    rc = main(["info", bundle_url, "--json", *_s3_args(s3)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    info = json.loads(out)
    assert info["target"] == "log_price"
    assert info["feature_names"][:7] == DIAMONDS_NUMERIC + ["volume"]
    summary = info["training_summary"]
    assert summary["strategy"] == "averaging" and summary["sync_every"] == 4
    assert summary["epochs_run"] == 1 and len(summary["history"]["val_mae"]) == 1
    assert np.isfinite(summary["final"]["val_mae"])
    assert set(info["input_schema"]) >= {"carat", "cut", "price"}

    rc = main(["info", bundle_url, *_s3_args(s3)])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert "features (27): carat, depth" in out
    assert "strategy averaging" in out and "val_mae" in out


@pytest.mark.slow
def test_keras_file_model_and_file_transform(remote_cluster, small_diamonds, model_def, tmp_path, capsys):
    """A compiled .keras file as the model; a transform from a plain .py file travels by value."""
    import keras

    write_csv_shards(small_diamonds.iloc[:1500], str(tmp_path / "train"), 2)
    write_csv_shards(small_diamonds.iloc[1500:1700], str(tmp_path / "in"), 2)
    model = keras.Sequential([keras.Input((27,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    model.save(tmp_path / "m.keras")
    bundle = str(tmp_path / "m.bundle")
    rc = main([
        "train", "--data", str(tmp_path / "train"), *FEATURES, "--transform", f"{model_def}:my_transform",
        "--model", str(tmp_path / "m.keras"), "--epochs", "1", "--batch-size", "128",
        "--validation-fraction", "0.2", "--checkpoint", str(tmp_path / "ckpt"), "--out", bundle,
        "--scheduler", remote_cluster.address, "--quiet",
    ])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == ""  # --quiet
    assert os.path.exists(bundle) and os.listdir(tmp_path / "ckpt")

    # the bundle cannot import the file's transform: say so, in one line
    args = ["predict", "--bundle", bundle, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--scheduler", remote_cluster.address]
    rc = main(args)
    _, err = capsys.readouterr()
    assert rc == 2
    assert "--transform" in _one_line_error(err)
    rc = main([*args, "--transform", f"{model_def}:my_transform"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "2 done (200 rows)" in out
    assert len(pd.read_csv(tmp_path / "out" / "part-000.csv")) == 100


@pytest.mark.slow
def test_predict_exits_non_zero_when_a_file_fails(remote_cluster, local_bundle, small_diamonds, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    small_diamonds.iloc[:50].to_csv(inp / "a.csv", index=False)
    small_diamonds.iloc[50:100].drop(columns=["carat"]).to_csv(inp / "b.csv", index=False)
    rc = main(["predict", "--bundle", local_bundle, "--input", str(inp), "--output", str(tmp_path / "out"),
               "--scheduler", remote_cluster.address])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "1 done (50 rows), 0 skipped, 1 failed" in out
    line = _one_line_error(err)
    assert "b.csv" in line and "carat" in line
    assert (tmp_path / "out" / "a.csv").exists() and not (tmp_path / "out" / "b.csv").exists()


# ------------------------------------------------------------------- the entry point
def test_python_m_daskml_scale_runs_as_a_process(local_bundle):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ok = subprocess.run([sys.executable, "-m", "daskml_scale", "info", local_bundle, "--json"],
                        capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["target"] == "log_price" and info["training_summary"] == {"note": "made by the test"}

    missing = subprocess.run([sys.executable, "-m", "daskml_scale", "info", local_bundle + ".missing"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("daskml-scale: error: BundleError:") and "does not exist" in last


# ---------------------------------------------------------------------- errors
def test_help_is_there_for_a_newcomer(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "daskml-scale train" in out and "daskml-scale predict" in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "build_fn(n_features)" in out and "--storage-option" in out and "--sync-every" in out
    assert main([]) == 2


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--data", "x.csv"], "the following arguments are required: --target, --model, --out"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", "--data", "x.csv", "--target", "y", "--model", "m.keras", "--out", "b", "--epochs", "two"],
         "argument --epochs: invalid int value: 'two'"),
        (["train", "--data", "x.csv", "--target", "y", "--model", "m.keras", "--out", "b",
          "--validation", "v.csv", "--validation-fraction", "0.1"], "not allowed with argument"),
        (["train", "--data", "x.csv", "--target", "y", "--model", "m.keras", "--out", "b"],
         "Expected feature columns"),
        (["train", "--data", "x.csv", "--target", "y", "--numeric", "a", "--model", "m.keras", "--out", "b",
          "--resume"], "--resume needs --checkpoint"),
        (["info", "b.bundle", "--storage-option", "endpoint"], "Expected --storage-option KEY=VALUE"),
        (["train", "--data", "x.csv", "--target", "y", "--numeric", "a", "--model", "m.keras", "--out", "b",
          "--max-staleness", "2"], "--max-staleness applies to --strategy ps-async only"),
        (["info", "b.bundle", "--transform", "no_function_named"], "Expected --transform as module.py:function"),
        (["train", "--data", "x.csv", "--target", "y", "--numeric", "a", "--model", "m.keras", "--out", "b",
          "--missing-target", "skip"], "argument --missing-target: invalid choice: 'skip'"),
        (["train", "--data", "x.csv", "--target", "y", "--numeric", "a", "--model", "m.keras", "--out", "b",
          "--task", "binary"], "argument --task: invalid choice: 'binary'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, expected, capsys):
    rc = main(argv)
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith("daskml-scale")
    assert expected in line


@pytest.mark.slow
def test_parameter_server_strategy(remote_cluster, small_diamonds, model_def, tmp_path, capsys):
    """--strategy ps-async maps to daskml_scale.ParameterServer(mode="async", ...)."""
    write_csv_shards(small_diamonds.iloc[:1000], str(tmp_path / "train"), 2)
    bundle = str(tmp_path / "ps.bundle")
    rc = main(["train", "--data", str(tmp_path / "train"), *FEATURES,
               "--transform", "daskml_scale.datasets:diamonds_transform", "--model", f"{model_def}:build_model",
               "--strategy", "ps-async", "--sync-every", "2", "--max-staleness", "4", "--epochs", "1",
               "--batch-size", "128", "--out", bundle, "--scheduler", remote_cluster.address])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "strategy parameter_server, mode async, push_every 2" in out
    summary = daskml_scale.load_bundle(bundle).info()["training_summary"]
    assert summary["strategy"] == "parameter_server" and summary["mode"] == "async"
    assert summary["history"]["ps_applied"][0] > 0


def test_missing_files_give_one_line_and_exit_1(tmp_path, small_diamonds, capsys):
    rc = main(["train", "--data", str(tmp_path / "nothing" / "*.csv"), *FEATURES, "--model", "m.py:build",
               "--out", str(tmp_path / "b.bundle")])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 1 and "nothing" in line and line.startswith("daskml-scale: error: DataError")

    rc = main(["predict", "--bundle", str(tmp_path / "none.bundle"), "--input", str(tmp_path), "--output",
               str(tmp_path / "out")])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 1 and "none.bundle" in line and "does not exist" in line

    small_diamonds.iloc[:100].to_csv(tmp_path / "d.csv", index=False)
    rc = main(["train", "--data", str(tmp_path / "d.csv"), *FEATURES, "--transform", str(tmp_path / "t.py") + ":fn",
               "--model", "m.py:build", "--out", str(tmp_path / "b.bundle")])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 1 and "no such file" in line and "t.py" in line

    rc = main(["info", str(tmp_path / "none.bundle"), "--verbose"])
    assert rc == 1 and "Traceback" in capsys.readouterr().err  # --verbose shows it


def test_unreachable_scheduler_gives_one_line_and_exit_1(local_bundle, tmp_path, capsys):
    address = f"tcp://127.0.0.1:{free_port()}"
    rc = main(["predict", "--bundle", local_bundle, "--input", str(tmp_path), "--output", str(tmp_path / "o"),
               "--scheduler", address, "--timeout", "2s", "--quiet"])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 1
    assert line.startswith("daskml-scale: error: ClusterError:") and address in line


# ----------------------------------------------------- messy real data, checks first
TF_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} \d\d:\d\d:\d\d)")
FLIGHTS_FEATURES = ["--numeric", *FLIGHTS_NUMERIC, "--categorical", *FLIGHTS_CATEGORICAL, "--target", "arr_delay"]


def _ours(stderr: str) -> list[str]:
    """stderr without TensorFlow's C++ start-up log (written before Python can configure it)."""
    return [line for line in stderr.splitlines() if line.strip() and not TF_NATIVE_LOG.match(line)]


@pytest.mark.slow
def test_train_on_raw_flights_missing_targets(model_def, tmp_path):
    """Raw flights (cancelled flights have no arr_delay) on a local cluster the command starts:
    the error is one line naming the file and line, with no worker traceback before it;
    --missing-target drop trains and says how many rows it dropped."""
    raw = flights().iloc[:3000]
    n_missing = int(raw["arr_delay"].isna().sum())
    assert n_missing > 0
    write_csv_shards(raw, str(tmp_path / "raw"), 2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "daskml_scale", "train", "--data", str(tmp_path / "raw" / "part-00[01].csv"),
            *FLIGHTS_FEATURES, "--model", f"{model_def}:build_model", "--out", str(tmp_path / "f.bundle"),
            "--workers", "1", "--threads-per-worker", "1", "--batch-size", "256"]
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert "Compute Failed" not in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
    lines = _ours(failed.stderr)
    assert len(lines) == 1, failed.stderr
    match = re.search(r"(part-00[01]\.csv), line (\d+), column 'arr_delay': the target is missing", lines[0])
    assert lines[0].startswith("daskml-scale: error: NonFiniteValueError:") and match, lines[0]
    assert "--missing-target drop" in lines[0]
    name, line = match.group(1), int(match.group(2))
    assert pd.read_csv(tmp_path / "raw" / name)["arr_delay"].isna().iloc[line - 2]  # that row has no target
    assert not (tmp_path / "f.bundle").exists()

    dropped = subprocess.run([*argv, "--missing-target", "drop"], capture_output=True, text=True, timeout=300,
                             env=env, cwd=tmp_path)
    assert dropped.returncode == 0, dropped.stderr
    assert f"{n_missing:,} rows without a target 'arr_delay' dropped" in dropped.stdout
    assert f"{len(raw) - n_missing:,} rows -> " in dropped.stdout
    assert _ours(dropped.stderr) == [], dropped.stderr
    summary = daskml_scale.load_bundle(str(tmp_path / "f.bundle")).info()["training_summary"]
    assert summary["train_rows"] == len(raw) - n_missing


def test_train_checks_its_arguments_before_the_pass_over_the_data(tmp_path, model_def, small_diamonds, capsys):
    """The model, the transform and the output locations are checked before a cluster
    starts for the pass over the data, each error about its argument."""
    small_diamonds.iloc[:100].to_csv(tmp_path / "d.csv", index=False)
    data = ["train", "--data", str(tmp_path / "d.csv"), *FEATURES]
    good_model = ["--model", f"{model_def}:build_model"]
    out = ["--out", str(tmp_path / "m.bundle")]
    cases = [
        ([*data, "--model", str(tmp_path / "missing.keras"), *out], 1, "--model: no such file"),
        ([*data, "--model", str(tmp_path / "missing.py") + ":build", *out], 1, "--model: no such file"),
        ([*data, *good_model, "--transform", f"{model_def}:no_such_function", *out], 1, "no_such_function"),
        ([*data, *good_model, "--out", str(tmp_path)], 2, "is a folder: expected a file name"),
        ([*data, *good_model, "--out", str(model_def) + "/m.bundle"], 2, "cannot write there"),
        ([*data, *good_model, *out, "--checkpoint", str(model_def)], 2, "--checkpoint"),
    ]
    for argv, code, expected in cases:
        rc = main(argv)
        captured = capsys.readouterr()
        line = _one_line_error(captured.err)
        assert rc == code and expected in line, (argv, line)
        assert "starting a local Dask cluster" not in captured.out  # no cluster, no pass over the data
