from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.exceptions import BadRowError, DataError, EmptyFileError, MissingColumnError


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture
def shards(tmp_path):
    a = write(tmp_path / "a.csv", "id,x,cat\n1,1.5,u\n2,,v\n3,2.5,u\n")
    # an integer column with a missing value in this file only
    b = write(tmp_path / "b.csv", "id,x,cat\n4,7,w\n,8,u\n6,9,v\n")
    return tmp_path, a, b


def test_glob_directory_and_list_keep_order(shards, client):
    d, a, b = shards
    by_glob = daskml_scale.read_csv(str(d / "*.csv")).compute()
    by_dir = daskml_scale.read_csv(str(d)).compute()
    by_list = daskml_scale.read_csv([b, a]).compute()
    # a.csv's rows then b.csv's, the empty field missing
    np.testing.assert_array_equal(by_glob["x"].to_numpy(dtype="float64", na_value=np.nan), [1.5, np.nan, 2.5, 7, 8, 9])
    assert by_glob["cat"].tolist() == ["u", "v", "u", "w", "u", "v"]
    pd.testing.assert_frame_equal(by_glob, by_dir)
    assert by_list["cat"].tolist() == ["w", "u", "v", "u", "v", "u"]


def test_integer_column_with_nan_in_one_file_keeps_dtype(shards, client):
    d, a, b = shards
    ddf = daskml_scale.read_csv(str(d / "*.csv"))
    assert str(ddf.dtypes["id"]) == "Int64"
    out = ddf.compute()
    assert str(out.dtypes["id"]) == "Int64"
    assert out["id"].isna().sum() == 1
    assert out["id"].dropna().tolist() == [1, 2, 3, 4, 6]


def test_provenance_names_file_and_line(shards, client):
    d, a, b = shards
    out = daskml_scale.read_csv([a, b], provenance=True).compute()
    assert out["_path"].tolist() == [a] * 3 + [b] * 3
    assert out["_line"].tolist() == [2, 3, 4, 2, 3, 4]


def test_split_file_partitions_are_exact(tmp_path, client):
    n = 50_000
    df = pd.DataFrame({"k": np.arange(n), "v": np.random.default_rng(0).random(n)})
    path = tmp_path / "big.csv"
    df.to_csv(path, index=False)
    ddf = daskml_scale.read_csv(str(path), blocksize=64_000, provenance=True)
    assert ddf.npartitions > 10
    out = ddf.compute()
    assert out["k"].tolist() == list(range(n))
    assert out["_line"].tolist() == list(range(2, n + 2))
    np.testing.assert_allclose(out["v"].to_numpy(), df["v"].to_numpy())


def test_compressed_csv(tmp_path, client):
    with gzip.open(tmp_path / "c.csv.gz", "wt") as f:
        f.write("a,b\n1,x\n2,y\n")
    out = daskml_scale.read_csv(str(tmp_path / "c.csv.gz"), provenance=True).compute()
    assert out["a"].tolist() == [1, 2]
    assert out["_line"].tolist() == [2, 3]


def test_s3_read_csv(s3, client):
    fs = s3.filesystem()
    fs.pipe(s3.url("in", "1.csv"), b"a,b\n1,x\n2,y\n")
    fs.pipe(s3.url("in", "2.csv"), b"a,b\n3,z\n")
    ddf = daskml_scale.read_csv(s3.url("in", "*.csv"), storage_options=s3.storage_options, provenance=True)
    out = ddf.compute()
    assert out["a"].tolist() == [1, 2, 3]
    assert out["_path"].iloc[0] == s3.url("in", "1.csv")


def test_read_parquet_local(tmp_path, client):
    pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]}).to_parquet(tmp_path / "p.parquet")
    assert daskml_scale.read_parquet(str(tmp_path / "p.parquet"))["b"].sum().compute() == 2.0
    with pytest.raises(MissingColumnError, match="'zzz'"):
        daskml_scale.read_parquet(str(tmp_path / "p.parquet"), columns=["a", "zzz"])


# ------------------------------------------------------------------ bad input
def test_wrong_number_of_fields_names_file_and_line(tmp_path, client):
    good = write(tmp_path / "1.csv", "a,b,c\n1,2,3\n")
    bad = write(tmp_path / "2.csv", "a,b,c\n1,2,3\n4,5,6\n7,8\n9,10,11\n")
    with pytest.raises(BadRowError) as err:
        daskml_scale.read_csv([good, bad]).compute()
    assert err.value.path == bad and err.value.line == 4
    assert "2.csv, line 4" in str(err.value) and "expected 3 fields, found 2" in str(err.value)


def test_text_in_numeric_column_names_file_line_and_column(tmp_path, client):
    good = write(tmp_path / "1.csv", "a,b\n1,2\n")
    bad = write(tmp_path / "2.csv", "a,b\n1,2\n\n3,oops\n")
    with pytest.raises(BadRowError) as err:
        daskml_scale.read_csv([good, bad]).compute()
    assert (err.value.path, err.value.line, err.value.column) == (bad, 4, "b")
    assert "'oops'" in str(err.value)


def test_missing_column_names_the_column(tmp_path, client):
    good = write(tmp_path / "1.csv", "a,b\n1,2\n")
    bad = write(tmp_path / "2.csv", "a,c\n1,2\n")
    with pytest.raises(MissingColumnError) as err:
        daskml_scale.read_csv([good, bad]).compute()
    assert err.value.column == "b" and err.value.path == bad
    with pytest.raises(MissingColumnError, match="'nope'"):
        daskml_scale.read_csv(good, columns=["a", "nope"])


def test_empty_file(tmp_path, client):
    good = write(tmp_path / "1.csv", "a,b\n1,2\n")
    empty = write(tmp_path / "2.csv", "")
    with pytest.raises(EmptyFileError) as err:
        daskml_scale.read_csv([good, empty]).compute()
    assert err.value.path == empty
    with pytest.raises(EmptyFileError):
        daskml_scale.read_csv(empty)


def test_no_files_is_clear(tmp_path):
    with pytest.raises(DataError, match="No files match"):
        daskml_scale.read_csv(str(tmp_path / "nothing-*.csv"))


def test_skip_bad_rows_counts_them_per_file(tmp_path, client):
    a = write(tmp_path / "skip-a.csv", "a,b\n1,2\n3\n5,6\n")
    b = write(tmp_path / "skip-b.csv", "a,b\n1,x\n2,3\n4,y\n")
    out = daskml_scale.read_csv([a, b], on_bad_rows="skip", provenance=True).compute()
    assert out["a"].tolist() == [1, 5, 2]
    assert out["_line"].tolist() == [2, 4, 3]
    report = daskml_scale.bad_rows_report(client).set_index("path")
    assert report.loc[a, "skipped"] == 1
    assert report.loc[b, "skipped"] == 2


def test_on_bad_rows_is_validated(tmp_path):
    with pytest.raises(ValueError, match="on_bad_rows"):
        daskml_scale.read_csv(write(tmp_path / "1.csv", "a\n1\n"), on_bad_rows="ignore")


# ------------------------------------------------------------------ messy CSVs
BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def some_diamonds():
    from daskml_scale.datasets import diamonds

    return diamonds().iloc[:6000]


def test_utf8_byte_order_mark_is_stripped(tmp_path, some_diamonds, client):
    """What spreadsheet programs write as "CSV UTF-8": a BOM before the header, CRLF lines."""
    df = some_diamonds
    df.iloc[:4000].to_csv(tmp_path / "a.csv", index=False, encoding="utf-8-sig", lineterminator="\r\n")
    df.iloc[4000:].to_csv(tmp_path / "b.csv", index=False)
    assert (tmp_path / "a.csv").read_bytes().startswith(BOM + b"id,carat")
    # byte-range pieces of a file with a BOM: only the piece at offset 0 holds it
    ddf = daskml_scale.read_csv(str(tmp_path / "*.csv"), columns=["id", "carat", "cut"], blocksize=40_000,
                                provenance=True)
    assert ddf.npartitions > 4
    out = ddf.compute()
    assert list(out.columns) == ["id", "carat", "cut", "_path", "_line"]
    assert out["id"].tolist() == df["id"].tolist()
    assert out["cut"].tolist() == df["cut"].tolist()
    np.testing.assert_array_equal(out["carat"].to_numpy(), df["carat"].to_numpy())
    assert out["_line"].tolist() == list(range(2, 4002)) + list(range(2, 2002))
    whole = daskml_scale.read_csv(str(tmp_path / "a.csv"), blocksize=None).compute()
    assert list(whole.columns) == list(df.columns)


def test_header_only_file_is_a_partition_without_rows(tmp_path, some_diamonds, client):
    df = some_diamonds.iloc[:500]
    # sorted first: the header-only file is sampled first, and must not make text columns numbers
    df.iloc[:0].to_csv(tmp_path / "a-empty.csv", index=False)
    df.to_csv(tmp_path / "b.csv", index=False)
    assert (tmp_path / "a-empty.csv").read_text().count("\n") == 1
    ddf = daskml_scale.read_csv(str(tmp_path / "*.csv"), provenance=True)
    assert pd.api.types.is_string_dtype(ddf.dtypes["cut"]) and str(ddf.dtypes["price"]) == "Int64"
    first = ddf.partitions[0].compute()
    assert len(first) == 0 and list(first.columns) == [*df.columns, "_path", "_line"]
    assert pd.api.types.is_string_dtype(first.dtypes["cut"]) and str(first.dtypes["price"]) == "Int64"
    assert str(first.dtypes["carat"]) == "float64"
    out = ddf.compute()
    assert out["id"].tolist() == df["id"].tolist() and out["cut"].tolist() == df["cut"].tolist()
    # only header-only files: their columns, no rows
    alone = daskml_scale.read_csv(str(tmp_path / "a-empty.csv")).compute()
    assert len(alone) == 0 and list(alone.columns) == list(df.columns)
    # a file with nothing at all is still an error
    (tmp_path / "c.csv").write_text("")
    with pytest.raises(EmptyFileError):
        daskml_scale.read_csv(str(tmp_path / "c.csv"))


def test_glob_with_character_class_and_question_mark(tmp_path, some_diamonds, client):
    from daskml_scale.datasets import write_csv_shards

    df = some_diamonds.iloc[:300]
    write_csv_shards(df, str(tmp_path), 3)  # part-000.csv ... part-002.csv
    two = daskml_scale.read_csv(str(tmp_path / "part-00[01].csv")).compute()
    assert two["id"].tolist() == df["id"].iloc[:200].tolist()
    last = daskml_scale.read_csv(str(tmp_path / "part-00[!01].csv")).compute()
    assert last["id"].tolist() == df["id"].iloc[200:].tolist()
    every = daskml_scale.read_csv(str(tmp_path / "part-00?.csv")).compute()
    assert every["id"].tolist() == df["id"].tolist()
    with pytest.raises(DataError, match="No files match"):
        daskml_scale.read_csv(str(tmp_path / "part-0[5-9]?.csv"))
    # a file whose name holds brackets is still found by its name
    literal = write(tmp_path / "scores[1].csv", "a,b\n1,2\n")
    assert daskml_scale.read_csv(literal).compute()["a"].tolist() == [1]


def test_s3_glob_with_character_class(s3, client):
    fs = s3.filesystem()
    for i in range(3):
        fs.pipe(s3.url("in", f"part-0{i}.csv"), f"a,b\n{i},x\n".encode())
    ddf = daskml_scale.read_csv(s3.url("in", "part-0[02].csv"), storage_options=s3.storage_options, provenance=True)
    out = ddf.compute()
    assert out["a"].tolist() == [0, 2]
    assert out["_path"].tolist() == [s3.url("in", "part-00.csv"), s3.url("in", "part-02.csv")]
