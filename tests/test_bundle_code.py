"""``save_bundle(..., code=[...])``: the user's source files inside the bundle, what
each kind of item stores, the safe-mode refusal, and loading the code by name."""

from __future__ import annotations

import sys
import uuid
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from daskml_scale import ArgumentError, Bundle, Preprocessor, UnsafeBundleError, load_bundle, save_bundle
from daskml_scale.bundle import FORMAT_VERSION
from daskml_scale.bundle_code import install_code
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds
from daskml_scale.exceptions import DaskmlScaleWarning

from . import keras_objects

TRANSFORM = '''
import numpy as np


def transform(df):
    out = df.copy()
    out["volume"] = out["x"] * out["y"] * out["z"]
    if "price" in out.columns:
        out["log_price"] = np.log(out["price"].astype("float64"))
    return out
'''


@pytest.fixture(scope="module")
def table():
    return diamonds().iloc[:2000]


def _model(n: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((n,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])


def _package(root: Path) -> str:
    """A package ``pkg_<id>`` with a submodule holding the transform; returns its name."""
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("from . import features\n")
    (root / name / "features.py").write_text(TRANSFORM)
    (root / name / "__pycache__").mkdir()
    (root / name / "__pycache__" / "junk.py").write_text("raise SystemExit")
    return name


def _forget(name: str) -> None:
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def test_each_kind_of_code_item_is_stored(tmp_path, table):
    pre = Preprocessor(target="price", numeric=DIAMONDS_NUMERIC).fit(table)
    model = _model(len(pre.feature_names_))
    single = tmp_path / "helpers_one.py"
    single.write_text(TRANSFORM)
    pkg = _package(tmp_path / "src")
    url = save_bundle(model, pre, str(tmp_path / "m.bundle"), code=[keras_objects, "tests.keras_objects", single,
                                                                     tmp_path / "src" / pkg])
    with zipfile.ZipFile(url) as zf:
        code = sorted(n for n in zf.namelist() if n.startswith("code/"))
    # the module and its parent package once, the .py file, the package without __pycache__
    assert code == sorted([
        "code/tests/__init__.py", "code/tests/keras_objects.py", "code/helpers_one.py",
        f"code/{pkg}/__init__.py", f"code/{pkg}/features.py",
    ])
    info = Bundle(Path(url).read_bytes(), lazy=True).info()
    assert info["code"] == {"modules": ["tests.keras_objects", "helpers_one", pkg], "files": code}
    assert info["format_version"] == FORMAT_VERSION == 2
    plain = save_bundle(model, pre, str(tmp_path / "plain.bundle"))
    assert load_bundle(plain).info()["format_version"] == 1  # older readers still read bundles without code
    assert load_bundle(plain).info()["code"] is None


@pytest.mark.parametrize("item", ["no_such_module_xyz", "/nowhere/x.py", 3, "a folder without __init__.py"])
def test_bad_code_items_are_argument_errors(tmp_path, table, item):
    pre = Preprocessor(target="price", numeric=DIAMONDS_NUMERIC).fit(table)
    item = tmp_path if item == "a folder without __init__.py" else item
    with pytest.raises(ArgumentError, match="Expected code="):
        save_bundle(_model(len(pre.feature_names_)), pre, str(tmp_path / "m.bundle"), code=[item])


def test_code_needs_the_opt_in_and_then_provides_the_transform(tmp_path, table, monkeypatch):
    src = tmp_path / "src"
    pkg = _package(src)
    monkeypatch.syspath_prepend(str(src))
    features = __import__(f"{pkg}.features", fromlist=["transform"])
    pre = Preprocessor(
        target="log_price", numeric=[*DIAMONDS_NUMERIC, "volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=features.transform,
    ).fit(table)
    assert pre.to_dict()["transform"]["ref"] == f"{pkg}.features:transform"
    model = _model(len(pre.feature_names_))
    url = save_bundle(model, pre, str(tmp_path / "m.bundle"), code=[src / pkg])
    X, _ = pre.transform(table)
    expected = np.asarray(model(X, training=False)).ravel()
    # the machine that loads it does not have the package
    monkeypatch.undo()
    _forget(pkg)

    with pytest.raises(UnsafeBundleError) as err:
        load_bundle(url)
    assert f"code/{pkg}/features.py" in str(err.value) and "safe_mode=False" in str(err.value)
    assert pkg not in sys.modules  # refusing imported nothing
    lazy = Bundle(Path(url).read_bytes(), lazy=True)  # safe mode can still describe it
    assert lazy.info()["code"]["modules"] == [pkg]
    with pytest.raises(UnsafeBundleError, match="safe_mode=False"):
        lazy.predict_frame(table.iloc[:5])
    with pytest.raises(UnsafeBundleError, match="safe_mode=False"):
        lazy.model  # noqa: B018

    bundle = load_bundle(url, safe_mode=False)
    assert "daskml-scale-code-" in sys.modules[f"{pkg}.features"].__file__
    assert bundle.preprocessor.transform_fn is sys.modules[f"{pkg}.features"].transform
    got = bundle.predict_frame(table)["prediction"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    _forget(pkg)


def test_a_module_imported_from_other_source_is_kept_with_a_warning(tmp_path, monkeypatch):
    name = f"helpers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(name)
    code = {"modules": [name], "files": [f"code/{name}.py"]}
    try:
        with pytest.warns(DaskmlScaleWarning, match="differs from the bundle's copy"):
            install_code(code, {f"code/{name}.py": b"VALUE = 2\n"}, key=uuid.uuid4().hex)
        assert sys.modules[name].VALUE == 1
        install_code(code, {f"code/{name}.py": b"VALUE = 1\n"}, key=uuid.uuid4().hex)  # same source: silent
    finally:
        _forget(name)


def test_the_cli_needs_unsafe_for_a_bundle_with_code(tmp_path, table, capsys):
    from daskml_scale.cli import main

    pre = Preprocessor(target="price", numeric=DIAMONDS_NUMERIC).fit(table)
    model = _model(len(pre.feature_names_))
    model.compile(optimizer="adam", loss="mse")
    url = save_bundle(model, pre, str(tmp_path / "m.bundle"), code=[keras_objects])
    assert main(["info", url]) == 1
    err = capsys.readouterr().err
    assert "--unsafe" in err and "keras_objects.py" in err and len(err.strip().splitlines()) == 1
    assert main(["info", url, "--unsafe", "--json"]) == 0
    out = capsys.readouterr().out
    assert "tests/keras_objects.py" in out
