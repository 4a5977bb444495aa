"""Pictures of results (daskml_scale.plots), the live view (daskml_scale.live) and
``daskml-scale info --plot``: curves drawn from a real fit on the shared cluster, a
regression and two classification bundles compared with the truth, PNGs read back."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.cli import main
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform
from daskml_scale.plots import curve_names, history_of, roc

pytest.importorskip("matplotlib")
NUMERIC = DIAMONDS_NUMERIC + ["volume"]


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)


def assert_drawn(data: bytes) -> None:
    px = png_pixels(data)
    assert px.shape[0] > 100 and px.shape[1] > 100
    assert px.std() > 5, "the picture is blank"


def lines_of(ax) -> dict[str, list[float]]:
    return {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return diamonds().sample(n=2400, random_state=3).reset_index(drop=True)


def mlp(n_features: int, out: int = 1, activation: str | None = None, loss: str = "mse", metrics=("mae",)):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(out, activation=activation)])
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss=loss, metrics=list(metrics))
    return model


@pytest.fixture(scope="module")
def fitted(rows, client, tmp_path_factory):
    """A real 2-epoch fit on the shared cluster with a LivePlot recording, and its bundle."""
    train, val = rows.iloc[:2000], rows.iloc[2000:]
    pre = daskml_scale.Preprocessor(target="log_price", numeric=NUMERIC, categorical=DIAMONDS_CATEGORICAL,
                                    transform=diamonds_transform).fit(train)
    model = mlp(pre.n_features_)
    live = daskml_scale.LivePlot(display="none")
    history = daskml_scale.fit(model, dd.from_pandas(train, npartitions=4), preprocessor=pre, epochs=2,
                               validation_data=val, callbacks=[live], verbose=0, client=client,
                               strategy=daskml_scale.ModelAveraging(sync_every=4))
    url = str(tmp_path_factory.mktemp("plots") / "reg.bundle")
    daskml_scale.save_bundle(model, pre, url, training_summary=history.daskml_summary)
    return history, live, url, val, client


def test_history_plot_draws_the_fits_curves(fitted, tmp_path):
    history, _, _, _, _ = fitted
    h = history.history
    fig = history.plot()
    names = [ax.get_title() for ax in fig.axes]
    assert names == ["loss", "mae"]  # the strategy's counters are not panels
    loss = lines_of(fig.axes[0])
    np.testing.assert_allclose(loss["train"], h["loss"])
    np.testing.assert_allclose(loss["validation"], h["val_loss"])
    np.testing.assert_allclose(lines_of(fig.axes[1])["validation"], h["val_mae"])
    # the same picture through the function, written to a file
    out = daskml_scale.plot_history(h, metrics=["loss"], path=str(tmp_path / "loss.png"))
    assert len(out.axes) == 1
    assert_drawn((tmp_path / "loss.png").read_bytes())
    # the summary keeps the whole history (what a bundle stores)
    assert history.daskml_summary["history"] == {k: [float(x) for x in v] for k, v in h.items()}
    json.dumps(history.daskml_summary["history"])


def test_live_plot_records_epochs_and_rows_per_worker(fitted):
    history, live, _, _, client = fitted
    for k, v in history.history.items():
        np.testing.assert_allclose(live.history[k], v)
    assert len(live.rates) == 2
    summary = history.daskml_summary
    for r in live.rates:
        assert set(r["workers"]) == set(client.nthreads())
        # each worker's rate is its stream's rows over the epoch's time: together, every training row
        assert sum(r["workers"].values()) * r["seconds"] == pytest.approx(summary["train_rows"], rel=1e-6)
        assert r["rows_per_s"] == pytest.approx(sum(r["workers"].values()))


def test_bundle_history_plot_and_cli_info_plot(fitted, tmp_path, capsys):
    history, _, url, _, _ = fitted
    bundle = daskml_scale.load_bundle(url, transform=diamonds_transform)
    fig = daskml_scale.plot_history(bundle)
    np.testing.assert_allclose(lines_of(fig.axes[0])["train"], history.history["loss"])
    out = tmp_path / "curves.png"
    assert main(["info", url, "--plot", str(out), "--transform", "daskml_scale.datasets:diamonds_transform"]) == 0
    assert f"wrote the training curves to {out}" in capsys.readouterr().out
    assert_drawn(out.read_bytes())
    svg = tmp_path / "curves.svg"
    assert main(["info", url, "--json", "--plot", str(svg)]) == 0
    json.loads(capsys.readouterr().out)  # stdout stays JSON
    assert svg.read_text().lstrip().startswith("<?xml")


def test_cli_info_plot_without_history_is_one_clear_line(tmp_path, rows, capsys):
    pre = daskml_scale.Preprocessor(target="log_price", numeric=NUMERIC, transform=diamonds_transform).fit(rows)
    url = str(tmp_path / "bare.bundle")
    daskml_scale.save_bundle(mlp(pre.n_features_), pre, url, training_summary={"note": "no history"})
    assert main(["info", url, "--plot", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err
    assert "per-epoch history" in err and "training_summary=history.daskml_summary" in err
    assert not (tmp_path / "x.png").exists()
    assert main(["info", url, "--plot", str(tmp_path / "x.gif")]) != 0
    assert ".png, .svg or .pdf" in capsys.readouterr().err


def test_regression_pictures_match_the_bundles_predictions(fitted, tmp_path):
    _, _, url, val, _ = fitted
    bundle = daskml_scale.load_bundle(url, transform=diamonds_transform)
    fig = daskml_scale.plot_predictions(bundle, val, path=str(tmp_path / "pred.png"))
    assert_drawn((tmp_path / "pred.png").read_bytes())
    # independently: the predictions of the public API against the transformed target
    pred = bundle.predict_frame(val)["prediction"].to_numpy(np.float64)
    actual = np.log(val["price"].to_numpy(np.float64))
    scatter, hist = fig.axes
    xy = scatter.collections[0].get_offsets()
    np.testing.assert_allclose(xy[:, 0], actual, rtol=1e-6)
    np.testing.assert_allclose(xy[:, 1], pred, rtol=1e-5, atol=1e-6)
    assert fig.daskml_scores["mae"] == pytest.approx(np.mean(np.abs(pred - actual)), rel=1e-5)
    assert f"MAE {fig.daskml_scores['mae']:.4g}" in scatter.get_title()
    assert sum(p.get_height() for p in hist.patches) == len(val)  # every row is in the histogram
    # a Dask frame is sampled down to max_rows
    small = daskml_scale.plot_predictions(bundle, dd.from_pandas(val, npartitions=2), max_rows=150)
    assert 100 <= len(small.axes[0].collections[0].get_offsets()) <= 150


def classification_bundle(rows: pd.DataFrame, target: str, path: str, classes: int):
    pre = daskml_scale.Preprocessor(target=target, numeric=NUMERIC, categorical=["color", "clarity"],
                                    transform=diamonds_transform).fit(rows)
    X, y = pre.transform(rows)
    if classes == 2:
        model = mlp(pre.n_features_, 1, "sigmoid", "binary_crossentropy", ["accuracy"])
    else:
        model = mlp(pre.n_features_, classes, "softmax", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(X, y, epochs=3, batch_size=128, verbose=0)
    daskml_scale.save_bundle(model, pre, path)
    return daskml_scale.load_bundle(path, transform=diamonds_transform)


def test_binary_classification_confusion_matrix_and_roc(rows, tmp_path):
    from sklearn.metrics import roc_auc_score

    data = rows.assign(pricey=np.where(rows["price"] > 2400, "high", "low"))
    train, val = data.iloc[:2000], data.iloc[2000:]
    bundle = classification_bundle(train.drop(columns="price"), "pricey", str(tmp_path / "b.bundle"), 2)
    fig = daskml_scale.plot_predictions(bundle, val.drop(columns="price"))
    pred = bundle.predict_frame(val.drop(columns="price"))
    expected = pd.crosstab(val["pricey"], pred["label"]).reindex(index=["high", "low"], columns=["high", "low"],
                                                                 fill_value=0).to_numpy()
    cm, curve = fig.axes
    np.testing.assert_array_equal(cm.get_images()[0].get_array(), expected)
    assert fig.daskml_scores["accuracy"] == pytest.approx(np.trace(expected) / len(val))
    auc = roc_auc_score(val["pricey"] == "low", pred["proba_low"])
    assert fig.daskml_scores["auc"]["low"] == pytest.approx(auc, abs=1e-6)
    assert auc > 0.8  # the model learned something: the curve is not the diagonal
    assert any(f"AUC {auc:.3f}" in t.get_text() for t in curve.get_legend().get_texts())
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert_drawn(buf.getvalue())


def test_three_class_confusion_matrix_and_one_vs_rest_roc(rows, tmp_path):
    from sklearn.metrics import roc_auc_score

    data = rows.assign(size=pd.cut(rows["carat"], [0, 0.5, 1.0, 10], labels=["s", "m", "l"]).astype(str))
    data = data.drop(columns=["carat"])
    numeric = [c for c in NUMERIC if c != "carat"]
    pre = daskml_scale.Preprocessor(target="size", numeric=numeric, transform=diamonds_transform).fit(data.iloc[:2000])
    X, y = pre.transform(data.iloc[:2000])
    model = mlp(pre.n_features_, 3, "softmax", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(X, y, epochs=3, batch_size=128, verbose=0)
    daskml_scale.save_bundle(model, pre, str(tmp_path / "c.bundle"))
    bundle = daskml_scale.load_bundle(str(tmp_path / "c.bundle"), transform=diamonds_transform)
    val = data.iloc[2000:]
    fig = daskml_scale.plot_predictions(bundle, val)
    classes = pre.classes_
    assert len(classes) == 3
    pred = bundle.predict_frame(val)
    m = fig.axes[0].get_images()[0].get_array()
    assert m.sum() == len(val)
    np.testing.assert_array_equal(np.diag(m), [((val["size"] == c) & (pred["label"] == c)).sum() for c in classes])
    for c in classes:
        assert fig.daskml_scores["auc"][c] == pytest.approx(roc_auc_score(val["size"] == c, pred[f"proba_{c}"]), abs=1e-6)
    assert len(fig.axes[1].get_lines()) == 4  # three classes and the diagonal


def test_roc_matches_a_hand_computed_curve():
    fpr, tpr, area = roc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.8, 0.1]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert area == pytest.approx(0.875)


def test_live_plot_widget_with_keras_fit(rows):
    """LivePlot is a callback for plain keras Model.fit too; the widget is built and fed."""
    pytest.importorskip("ipywidgets")
    pre = daskml_scale.Preprocessor(target="log_price", numeric=NUMERIC, transform=diamonds_transform).fit(rows)
    X, y = pre.transform(rows)
    model = mlp(pre.n_features_)
    live = daskml_scale.LivePlot(display="widget")
    model.fit(X, y, epochs=3, batch_size=256, validation_split=0.2, callbacks=[live], verbose=0)
    parts = live._parts
    assert parts["epochs"].value == 3 and parts["epochs"].bar_style == "success"
    assert parts["rounds"].value == parts["rounds"].max == int(np.ceil(0.8 * len(rows) / 256))
    assert "epoch 3/3 - done" in parts["title"].value
    assert_drawn(parts["curves"].value)
    assert live.history["val_loss"] == pytest.approx(model.history.history["val_loss"])
    assert "rows_per_s" not in live.rates[-1]  # keras's fit does not say how many rows each worker has


def test_live_plot_text_lines(fitted, capsys):
    _, live, _, _, _ = fitted
    line = live.epoch_line(1, {"loss": 0.5, "val_loss": 0.25})
    assert line.startswith("epoch 2/2 - ") and "loss: 0.5" in line and "val_loss: 0.25" in line
    assert "rows/s (" in line and line.count("127.0.0.1:") == 2


def test_fit_text_view_outside_a_notebook(rows, client, capsys):
    """display="auto" outside a kernel prints one line per epoch with the rows/s."""
    pre = daskml_scale.Preprocessor(target="log_price", numeric=NUMERIC, transform=diamonds_transform).fit(rows)
    daskml_scale.fit(mlp(pre.n_features_), rows, preprocessor=pre, epochs=1, verbose=0, client=client,
                     callbacks=[daskml_scale.LivePlot()], strategy=daskml_scale.ModelAveraging())
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("epoch 1/1 - ") and "rows/s" in out[0]


def test_bad_inputs_are_clear(rows):
    with pytest.raises(daskml_scale.ArgumentError, match="Expected a History"):
        daskml_scale.plot_history({})
    with pytest.raises(daskml_scale.ArgumentError, match=r"Expected metrics among \['loss'\]"):
        daskml_scale.plot_history({"loss": [1.0, 0.5]}, metrics=["auc"])
    with pytest.raises(daskml_scale.ArgumentError, match="display to be one of"):
        daskml_scale.LivePlot(display="gui")
    pre = daskml_scale.Preprocessor(target="log_price", numeric=NUMERIC, transform=diamonds_transform).fit(rows)
    path = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"plots-{os.getpid()}.bundle")
    daskml_scale.save_bundle(mlp(pre.n_features_), pre, path)
    bundle = daskml_scale.load_bundle(path, transform=diamonds_transform)
    with pytest.raises(daskml_scale.ArgumentError, match="target column 'log_price'"):
        daskml_scale.plot_predictions(bundle, rows.drop(columns=["price"]))
    with pytest.raises(daskml_scale.ArgumentError, match="pandas or Dask DataFrame"):
        daskml_scale.plot_predictions(bundle, rows.to_numpy())
    os.remove(path)


def test_curve_names_and_history_of():
    h = {"loss": [1.0], "val_loss": [0.9], "mae": [0.5], "allreduce_reduces": [3.0], "val_auc": [0.7]}
    assert curve_names(h) == ["loss", "mae", "auc"]
    assert history_of({"history": h, "workers": 2}) == h


def test_import_does_not_need_matplotlib_or_widgets():
    import subprocess

    code = "import sys, daskml_scale; print(sorted(m for m in ('matplotlib', 'ipywidgets', 'keras') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
