"""predict_files on messy CSV files: a UTF-8 byte-order mark, a header-only file, a glob
with a character class; and a bad row named by file and line in predict()."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale import NonFiniteValueError, predict, predict_files, save_bundle
from tests.test_bundle import train_regressor


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, pre, df = train_regressor(rows=2048)
    path = save_bundle(model, pre, str(tmp_path_factory.mktemp("model") / "price.bundle"))
    return path, df.iloc[:900].reset_index(drop=True)


def test_predict_files_messy_csvs(trained, tmp_path, client):
    bundle_path, df = trained
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    # what a spreadsheet program writes as "CSV UTF-8": a BOM, CRLF line ends
    df.iloc[:400].to_csv(inp / "part-00.csv", index=False, encoding="utf-8-sig", lineterminator="\r\n")
    df.iloc[:0].to_csv(inp / "part-01.csv", index=False)  # the header only
    df.iloc[400:900].to_csv(inp / "part-02.csv", index=False)
    df.iloc[:10].to_csv(inp / "part-10.csv", index=False)  # not matched by the glob
    assert (inp / "part-00.csv").read_bytes()[:3] == b"\xef\xbb\xbf"

    report = predict_files(bundle_path, str(inp / "part-0[0-2].csv"), str(out), keep="id", client=client)
    assert report.ok, str(report)
    assert sorted((e["input"].rsplit("/", 1)[-1], e["rows"]) for e in report.done) == [
        ("part-00.csv", 400), ("part-01.csv", 0), ("part-02.csv", 500),
    ]
    assert sorted(p.name for p in out.iterdir()) == ["part-00.csv", "part-01.csv", "part-02.csv"]
    empty = pd.read_csv(out / "part-01.csv")
    assert list(empty.columns) == ["id", "prediction"] and len(empty) == 0
    bundle = daskml_scale.load_bundle(bundle_path)
    for name, rows in (("part-00.csv", df.iloc[:400]), ("part-02.csv", df.iloc[400:900])):
        got = pd.read_csv(out / name)
        assert got["id"].tolist() == rows["id"].tolist()
        expected = bundle.predict_frame(rows.reset_index(drop=True))["prediction"].to_numpy()
        np.testing.assert_allclose(got["prediction"].to_numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_bad_row_in_predict_names_its_file_and_line(trained, tmp_path, client):
    """read_csv without provenance: the error still names the file and the line."""
    bundle_path, df = trained
    bad = df.iloc[:300].copy()
    bad["carat"] = bad["carat"].astype("float64")
    bad.loc[bad.index[123], "carat"] = np.inf
    df.iloc[300:600].to_csv(tmp_path / "a.csv", index=False)
    bad.to_csv(tmp_path / "b.csv", index=False)
    ddf = daskml_scale.read_csv(str(tmp_path / "*.csv"), blocksize=None)
    with pytest.raises(NonFiniteValueError) as err:
        predict(bundle_path, ddf, keep="id").compute()
    assert err.value.path == str(tmp_path / "b.csv") and err.value.line == 125 and err.value.column == "carat"
    assert f"{tmp_path / 'b.csv'}, line 125" in str(err.value)
    # predict_files says the same in its report
    report = predict_files(bundle_path, str(tmp_path / "b.csv"), str(tmp_path / "out"), client=client)
    assert not report.ok and f"b.csv, line 125, column 'carat'" in report.failed[0]["error"]
