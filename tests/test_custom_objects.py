"""Custom Keras objects (a loss, a metric, a layer, an activation) on the workers of a
fit: from a module the workers import, from one they cannot import, and from
``__main__`` as in a notebook; then bundled with their code, loaded and served in a
fresh process that does not have the module."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale import Preprocessor, TrainingError, load_bundle, save_bundle
from daskml_scale.custom_objects import _MAGIC, install_objects, ship_model
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform

from . import keras_objects

SOURCE = Path(keras_objects.__file__).read_text()
NUMERIC = [*DIAMONDS_NUMERIC, "volume"]


def _source(package: str) -> str:
    return SOURCE.replace('PACKAGE = "daskml_test"', f'PACKAGE = "{package}"')


def hidden_module(directory: Path) -> ModuleType:
    """The helper's code as the driver's own module, under a name that no worker (and
    no fresh process) can import: its file is on no one's path."""
    name = f"user_objects_{uuid.uuid4().hex[:8]}"
    path = directory / f"{name}.py"
    path.write_text(_source("daskml_hidden"))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def notebook_namespace() -> dict[str, Any]:
    """The helper's code run as a notebook cell runs: its objects live in ``__main__``."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(_source("daskml_notebook"), "<notebook cell>", "exec"), namespace)
    return namespace


def child_env() -> dict[str, str]:
    """A fresh process with this daskml_scale on its path, and nothing else of the tests'."""
    return {**os.environ, "PYTHONPATH": str(Path(daskml_scale.__file__).resolve().parent.parent)}


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame, Preprocessor]:
    table = diamonds().sample(n=8000, random_state=0).reset_index(drop=True)
    train, val = table.iloc[:6000], table.iloc[6000:]
    pre = Preprocessor(
        target="log_price", numeric=NUMERIC, categorical=DIAMONDS_CATEGORICAL, transform=diamonds_transform
    ).fit(train)
    return train, val, pre


def fit_on_workers(client, build_model, data, strategy) -> tuple[Any, dict[str, list[float]]]:
    train, val, pre = data
    model = build_model(len(pre.feature_names_))
    history = daskml_scale.fit(
        model, train, preprocessor=pre, validation_data=val, epochs=2, batch_size=128, client=client,
        strategy=strategy, verbose=0,
    )
    return model, history.history


def check_trained(model, history: dict[str, list[float]], data) -> None:
    """The custom loss and metric ran on the workers: the validation they computed
    there equals a single-process evaluation of the driver's trained model."""
    _, val, pre = data
    assert history["loss"][-1] < history["loss"][0]
    assert type(model.layers[0]).__name__ == "Affine"
    assert not np.allclose(model.layers[0].get_weights()[0], 1.0)  # the custom layer trained
    X, y = pre.transform(val)
    local = model.evaluate(X, y, batch_size=1024, verbose=0, return_dict=True)
    np.testing.assert_allclose(history["val_loss"][-1], local["loss"], rtol=1e-4)
    np.testing.assert_allclose(history["val_abs_error"][-1], local["abs_error"], rtol=1e-4)


@pytest.fixture(scope="module")
def hidden_fit(client, data, tmp_path_factory):
    module = hidden_module(tmp_path_factory.mktemp("user-code"))
    model, history = fit_on_workers(client, module.build_model, data, daskml_scale.ParameterServer("sync"))
    return module, model, history


# ---------------------------------------------------------------------------- fits
@pytest.mark.slow
def test_custom_objects_from_an_importable_module_train_on_workers(client, data):
    model, history = fit_on_workers(client, keras_objects.build_model, data, daskml_scale.ModelAveraging())
    check_trained(model, history, data)


@pytest.mark.slow
def test_custom_objects_workers_cannot_import_travel_by_value(client, data, hidden_fit):
    module, model, history = hidden_fit
    # no worker can import the module by name: what they used came by value
    assert not any(client.run(lambda name=module.__name__: importlib.util.find_spec(name) is not None).values())
    check_trained(model, history, data)  # the parameter server's actor and its workers loaded them


@pytest.mark.slow
def test_custom_objects_defined_in_main_as_in_a_notebook_train_on_workers(client, data):
    namespace = notebook_namespace()
    assert namespace["Affine"].__module__ == "__main__"
    model, history = fit_on_workers(client, namespace["build_model"], data, daskml_scale.AllReduce())
    check_trained(model, history, data)


# ------------------------------------------------------------------ the payload alone
def test_without_custom_objects_the_keras_bytes_travel_with_the_backend_name(monkeypatch):
    import keras

    from daskml_scale import backend

    monkeypatch.setattr(keras.saving, "get_custom_objects", lambda: {})  # whatever other tests registered
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="relu")])
    model.compile("adam", "mse", metrics=["mae"])
    raw = backend.model_to_bytes(model)
    plain = pickle.loads(ship_model(model, raw)[len(_MAGIC):])
    assert plain["keras"] == raw and plain["objects"] == [] and plain["backend"] == backend.name()
    shipped = ship_model(keras_objects.build_model(3), backend.model_to_bytes(keras_objects.build_model(3)))
    names = {e["name"]: e for e in pickle.loads(shipped[len(_MAGIC):])["objects"]}
    assert {"daskml_test>pinball", "daskml_test>AbsError", "daskml_test>Affine", "leaky_tanh"} <= set(names)
    assert names["leaky_tanh"]["needed"] and names["leaky_tanh"]["module"] == "tests.keras_objects"


def _roundtrip(model):
    from daskml_scale.custom_objects import load_shipped_model

    shipped = ship_model(model)
    return pickle.loads(shipped[len(_MAGIC):]), load_shipped_model(shipped)


def test_a_model_travels_as_its_config_and_values_and_comes_back_whole():
    """Without ``.keras`` bytes, a fit ships the config, the weights and the optimizer's
    variables: the model that loads predicts the same, has the same optimizer state
    (its step counter too) and a layer used twice is one layer again."""
    import keras

    inp = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh")
    out = keras.layers.Dense(1)(shared(shared(inp)))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-2), "mse", metrics=["mae"])
    X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    model.fit(X, X.sum(axis=1), epochs=2, batch_size=16, verbose=0)
    payload, loaded = _roundtrip(model)
    assert "keras" not in payload and payload["config"]["class_name"] == "Functional"
    assert len(loaded.weights) == len(model.weights) == 4  # the shared layer is not duplicated
    np.testing.assert_array_equal(np.asarray(loaded(X)), np.asarray(model(X)))
    assert [v.path for v in loaded.optimizer.variables] == [v.path for v in model.optimizer.variables]
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(loaded.optimizer.iterations) == 8 and loaded.loss == "mse"
    # the custom objects travel with the config as with the .keras bytes
    custom, restored = _roundtrip(keras_objects.build_model(3))
    assert {"daskml_test>pinball", "daskml_test>Affine", "leaky_tanh"} <= {e["name"] for e in custom["objects"]}
    assert "config" in custom and any(type(lyr).__name__ == "Affine" for lyr in restored.layers)


def test_a_shipped_optimizer_state_of_the_wrong_length_is_refused_by_count():
    import keras

    from daskml_scale import ArgumentError
    from daskml_scale.custom_objects import _from_config

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    model.optimizer.build(model.trainable_variables)
    payload = pickle.loads(ship_model(model)[len(_MAGIC):])
    payload["optimizer"] = payload["optimizer"][:-1]
    with pytest.raises(ArgumentError, match=r"Expected \d+ optimizer variables. Received: \d+"):
        _from_config(payload)


class _OwnState(__import__("keras").layers.Layer):
    """A layer that saves something of its own beside its variables."""

    def save_own_variables(self, store):  # pragma: no cover - never called here
        super().save_own_variables(store)


def test_a_model_with_state_beyond_its_variables_travels_as_keras_bytes():
    """An adapted lookup layer's vocabulary is an asset, not a variable; a layer with its
    own ``save_own_variables`` may save anything: both models travel as ``.keras`` bytes."""
    import keras

    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array(["a", "b", "c"]))
    inp = keras.Input((1,), dtype="string")
    model = keras.Model(inp, keras.layers.Dense(1)(keras.ops.cast(lookup(inp), "float32")))
    model.compile("adam", "mse")
    payload, loaded = _roundtrip(model)
    assert "keras" in payload and "config" not in payload
    (restored,) = [lyr for lyr in loaded.layers if isinstance(lyr, keras.layers.StringLookup)]
    assert restored.get_vocabulary() == lookup.get_vocabulary() and len(lookup.get_vocabulary()) == 4
    own = keras.Sequential([keras.Input((2,)), _OwnState(), keras.layers.Dense(1)])
    assert "keras" in pickle.loads(ship_model(own)[len(_MAGIC):])


LOADERS = r'''
import sys
import keras
import numpy as np
from daskml_scale.training.ps_actor import ParamServerActor
from daskml_scale.training.worker import model_for
data, X = open(sys.argv[1], "rb").read(), np.load(sys.argv[2])
assert sys.argv[3] not in sys.modules
actor = ParamServerActor(data, "sync", None, 30.0, direct=False)  # the parameter server's actor
out = [np.asarray(actor.model(X, training=False))]
actor.close()
keras.saving.get_custom_objects().clear()  # what the actor registered: the worker's loader registers again
out.append(np.asarray(model_for("fit-1", data).model(X, training=False)))
np.save(sys.argv[4], np.stack(out))
'''


@pytest.mark.slow
@pytest.mark.parametrize("form", ["keras", "config"])
def test_the_parameter_server_actor_and_the_worker_load_shipped_objects_in_a_fresh_process(tmp_path, form):
    """Each of the two worker-side loaders on its own, where nothing was registered
    before and the module cannot be imported: the model as ``.keras`` bytes, and as its
    config and values (what a fit ships)."""
    from daskml_scale import backend

    module = hidden_module(tmp_path)
    model = module.build_model(5)
    X = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    model.fit(X, X.sum(axis=1), epochs=1, verbose=0)
    shipped = ship_model(model, backend.model_to_bytes(model)) if form == "keras" else ship_model(model)
    assert (form in pickle.loads(shipped[len(_MAGIC):]))
    (tmp_path / "model.bin").write_bytes(shipped)
    np.save(tmp_path / "X.npy", X)
    env = child_env()
    args = [str(tmp_path / "model.bin"), str(tmp_path / "X.npy"), module.__name__, str(tmp_path / "out.npy")]
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", LOADERS, *args], cwd=run_dir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = np.asarray(model(X, training=False))
    for got in np.load(tmp_path / "out.npy"):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_needed_object_that_cannot_load_names_itself():
    entries = [
        {"name": "pkg>gone", "module": "no_such_module_xyz", "qualname": "gone", "needed": True, "value": None,
         "error": "PicklingError: cannot pickle 'lock' object"},
        {"name": "pkg>unused", "module": None, "qualname": "unused", "needed": False, "value": None, "error": None},
    ]
    with pytest.raises(TrainingError) as err:
        install_objects(entries)
    text = str(err.value)
    assert "'pkg>gone'" in text and "no_such_module_xyz" in text and "cannot pickle" in text
    assert "upload_file" in text and "unused" not in text


# ------------------------------------------------------------------- bundle and serve
CHILD = r'''
import asyncio, importlib.util, json, sys
import httpx
import pandas as pd
name, url, rows_path, out_path = sys.argv[1:5]
assert importlib.util.find_spec(name) is None, "the module must not be importable here"
from daskml_scale import UnsafeBundleError, load_bundle
from daskml_scale.serving import create_app
result = {}
try:
    load_bundle(url)
except UnsafeBundleError as exc:
    result["refused"] = str(exc)
assert name not in sys.modules
bundle = load_bundle(url, safe_mode=False)
result["module_file"] = sys.modules[name].__file__
rows = pd.read_json(rows_path, orient="records")
result["predict_frame"] = bundle.predict_frame(rows)["prediction"].tolist()

async def rest():
    app = create_app(url, safe_mode=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serving.test", timeout=120) as c:
            for _ in range(1200):
                if (await c.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            r = await c.post("/predict", json=json.loads(rows.to_json(orient="records")))
            assert r.status_code == 200, r.text
            return [o["prediction"] for o in r.json()]

result["rest"] = asyncio.run(rest())
with open(out_path, "w") as f:
    json.dump(result, f)
'''


@pytest.mark.slow
def test_bundle_with_code_loads_and_serves_where_the_module_is_missing(hidden_fit, data, tmp_path):
    module, model, _ = hidden_fit
    _, val, pre = data
    # the same statistics, with the user's own transform (stored by reference, module:fn)
    served_pre = Preprocessor.from_dict(pre.to_dict(), transform=module.transform)
    assert served_pre.to_dict()["transform"]["ref"] == f"{module.__name__}:transform"
    url = save_bundle(model, served_pre, str(tmp_path / "quantile.bundle"), code=[module])
    rows = val.drop(columns=["price"]).iloc[:64]
    X, _ = pre.transform(rows, with_target=False)
    expected = np.asarray(model(X, training=False)).ravel()
    np.testing.assert_allclose(load_bundle(url, safe_mode=False).predict_frame(rows)["prediction"], expected,
                               rtol=1e-5, atol=1e-6)

    rows_path, out_path = tmp_path / "rows.json", tmp_path / "out.json"
    rows.to_json(rows_path, orient="records")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, module.__name__, url, str(rows_path), str(out_path)],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out_path.read_text())
    assert f"code/{module.__name__}.py" in result["refused"] and "safe_mode=False" in result["refused"]
    assert "daskml-scale-code-" in result["module_file"]  # imported from the bundle's own copy
    np.testing.assert_allclose(result["predict_frame"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["rest"], expected, rtol=1e-5, atol=1e-6)


def test_a_worker_on_another_keras_backend_refuses_the_model_by_name():
    import keras

    from daskml_scale import backend
    from daskml_scale.custom_objects import load_shipped_model
    from daskml_scale.exceptions import TrainingError

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    payload = pickle.loads(ship_model(model, backend.model_to_bytes(model))[len(_MAGIC):])
    other = "jax" if backend.name() != "jax" else "tensorflow"
    forged = _MAGIC + pickle.dumps({**payload, "backend": other})
    with pytest.raises(TrainingError, match=f"driver's Keras backend '{other}'.*KERAS_BACKEND={other}"):
        load_shipped_model(forged)
