"""The example notebooks, executed with nbclient on a real Jupyter kernel (slow).

Each notebook runs cell by cell in a fresh ``python3`` kernel of this interpreter, on a
small subset of its data (``DASKML_EXAMPLE_ROWS``, ``DASKML_EXAMPLE_EPOCHS``), against the
shared test cluster (``DASK_SCHEDULER_ADDRESS``: the notebooks' own ``connect()`` joins
it). An error in any cell fails the test; the executed notebooks are written next to the
test's temporary files.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EPOCHS = 2
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

pytestmark = pytest.mark.slow


def run_notebook(name: str, tmp_path: Path, client, monkeypatch) -> "nbformat.NotebookNode":
    monkeypatch.setenv("DASKML_EXAMPLE_ROWS", "3000")
    monkeypatch.setenv("DASKML_EXAMPLE_EPOCHS", str(EPOCHS))
    monkeypatch.setenv("DASKML_EXAMPLE_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", client.scheduler.address)
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    runner = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    runner.execute()  # raises CellExecutionError on the first cell that fails
    keep = Path(os.environ.get("DASKML_TEST_ARTIFACTS") or tmp_path)  # where a report can show them
    keep.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, keep / name)
    return nb


def cell(nb, needle: str):
    found = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(found) == 1, f"expected one cell with {needle!r}"
    return found[0]


def pictures(c) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for o in c.outputs:
        data = o.get("data", {})
        if "image/png" in data:
            img = Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).convert("L")
            out.append(np.asarray(img, dtype=np.float64))
    return out


def assert_picture(c) -> None:
    imgs = pictures(c)
    assert imgs, f"no picture from {c.source!r}"
    assert all(px.shape[0] > 100 and px.std() > 5 for px in imgs), "a blank picture"


def widget_models(nb) -> list[dict]:
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    return [m for m in state.values()]


def test_quickstart_notebook_runs_with_the_live_view(tmp_path, client, monkeypatch):
    nb = run_notebook("quickstart.ipynb", tmp_path, client, monkeypatch)
    fit = cell(nb, "history = daskml_scale.fit(")
    # the live view, not Keras's text progress bar
    assert any(WIDGET_VIEW in o.get("data", {}) for o in fit.outputs), fit.outputs
    assert not any(o.get("output_type") == "stream" and "step" in o.get("text", "") for o in fit.outputs)
    bars = [m["state"] for m in widget_models(nb) if m.get("model_name") == "IntProgressModel"
            and m["state"].get("description") == "epochs"]
    assert bars and bars[-1]["value"] == EPOCHS and bars[-1]["bar_style"] == "success"
    titles = [m["state"]["value"] for m in widget_models(nb) if m.get("model_name") == "HTMLModel"
              and "daskml_scale.fit" in m["state"].get("value", "")]
    assert any(f"epoch {EPOCHS}/{EPOCHS} - done" in t for t in titles)
    workers = [m["state"]["value"] for m in widget_models(nb) if m.get("model_name") == "HTMLModel"
               and "rows/s" in m["state"].get("value", "")]
    assert workers and workers[-1].count("127.0.0.1:") == len(client.nthreads())
    assert_picture(cell(nb, "history.plot()"))
    assert_picture(cell(nb, "daskml_scale.plot_predictions(bundle, test)"))
    report = "".join(o.get("text", "") for o in cell(nb, "predict_files(").outputs)
    assert "2" in report and (tmp_path / "out" / "predictions").is_dir()
    assert sorted(p.name for p in (tmp_path / "out" / "predictions").iterdir() if p.suffix == ".csv") == [
        "part-000.csv", "part-001.csv"]
    assert (tmp_path / "out" / "diamonds.bundle").stat().st_size > 0


def test_laptop_to_cluster_notebook_runs_both_versions(tmp_path, client, monkeypatch):
    nb = run_notebook("laptop_to_cluster.ipynb", tmp_path, client, monkeypatch)
    table = cell(nb, '"laptop val_mae"').outputs[0]["data"]["text/plain"]
    assert "laptop val_mae" in table and "cluster val_mae" in table
    lines = [ln.split() for ln in table.splitlines()[2:] if ln.strip()]
    assert len(lines) == EPOCHS
    maes = np.array([[float(v) for v in ln[1:]] for ln in lines])
    assert np.all(np.isfinite(maes))
    assert np.all(maes[-1] < maes[0]), maes  # both versions learn: the error falls epoch by epoch
    assert_picture(cell(nb, "history.plot("))
    out = tmp_path / "out" / "l2c"
    assert (out / "laptop-predictions.csv").exists() and (out / "model.bundle").exists()
    assert sorted(p.name for p in (out / "predictions").iterdir() if p.suffix == ".csv") == ["part-000.csv",
                                                                                           "part-001.csv"]
