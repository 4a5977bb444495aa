"""The NumPy path of serving (:mod:`daskml_scale.serving.fastpath`): byte for byte the
answers and the refusals of the general frame path, on every protocol, for bundles with
and without a user transform, regressions and classifiers, one-hot and integer codes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.bundle import load_bundle, save_bundle
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform
from daskml_scale.serving import create_app
from daskml_scale.serving.fastpath import FastPath, fast_path_for
from daskml_scale.serving.forward import serving_forward

from .test_serving_protocols import served, v2_columns


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    df = diamonds().iloc[:2000].copy()
    df["expensive"] = (df["price"] > 2500).astype("int64")
    return df


def _mlp(width: int, out: int = 1, activation: str | None = None):
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((width,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(out, activation=activation)])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, table) -> dict[str, str]:
    """Bundle URLs: ``plain`` (no transform), ``transform`` (the diamonds transform),
    ``strict`` (missing="error"), ``classes`` (5 classes, one column as integer codes into
    an embedding: named model inputs), ``binary`` (a 0/1 target, one sigmoid output)."""
    import keras

    tmp = tmp_path_factory.mktemp("fastpath")
    out = {}
    for name, kw in {
        "plain": dict(target="price", numeric=DIAMONDS_NUMERIC, categorical=DIAMONDS_CATEGORICAL),
        "transform": dict(target="log_price", numeric=[*DIAMONDS_NUMERIC, "volume"], categorical=DIAMONDS_CATEGORICAL,
                          transform=diamonds_transform),
        "strict": dict(target="price", numeric=["carat", "depth"], categorical=["cut"], missing="error"),
        "binary": dict(target="expensive", numeric=["carat", "depth"], categorical=["color"]),
    }.items():
        pre = daskml_scale.Preprocessor(**kw).fit(table)
        binary = name == "binary"
        model = _mlp(pre.n_features_, activation="sigmoid" if binary else None)
        out[name] = save_bundle(model, pre, str(tmp / f"{name}.bundle"))
    # an integer-coded column feeds an embedding; price is an int64 feature
    pre = daskml_scale.Preprocessor(target="cut", numeric=["carat", "depth", "price"], categorical=["color", "clarity"],
                                    categorical_encoding={"clarity": "int"}).fit(table)
    keras.utils.set_random_seed(0)
    inputs, features = daskml_scale.model_inputs(pre, embedding_dims=3)
    model = keras.Model(inputs, keras.layers.Dense(len(pre.classes_), activation="softmax")(features))
    out["classes"] = save_bundle(model, pre, str(tmp / "classes.bundle"))
    return out


def _records(table: pd.DataFrame, cols: list[str], start: int, n: int) -> list[dict[str, Any]]:
    return table[cols].iloc[start : start + n].to_dict("records")


def _both(url: str, requests: list[tuple[str, str, dict[str, Any]]], concurrent: bool = False, **options: Any):
    """Each request against one app, with the NumPy path and then with the general path
    (``state.fast = None``): (status, content type, body) per request and path, and how many
    batches the NumPy path turned into features straight from the request's columns."""
    app = create_app(url, max_wait_ms=20, numpy_forward=False, **options)  # the same model call on both paths

    async def send(c):
        if concurrent:
            with_arrival = app.state.serving.batcher.arrival()
            with with_arrival:  # hold the first batch open until every request is queued
                tasks = [asyncio.ensure_future(c.request(m, p, **kw)) for m, p, kw in requests]
                await asyncio.sleep(0.05)
            rs = await asyncio.gather(*tasks)
        else:
            rs = [await c.request(m, p, **kw) for m, p, kw in requests]
        return [(r.status_code, r.headers.get("content-type"), r.content) for r in rs]

    async def go():
        async with served(app) as c:
            state = app.state.serving
            fast = state.fast
            assert isinstance(fast, FastPath)
            direct = []
            features = fast.features_of_columns
            fast.features_of_columns = lambda cols, n: direct.append(features(cols, n)) or direct[-1]
            numpy_answers = await send(c)
            state.fast = None
            general = await send(c)
            state.fast = fast
            return numpy_answers, general, sum(x is not None for x in direct)

    return asyncio.run(go())


def _post(path: str, body: Any, **headers: str) -> tuple[str, str, dict[str, Any]]:
    if isinstance(body, (bytes, str)):
        return "POST", path, {"content": body, "headers": headers}
    return "POST", path, {"json": body, "headers": headers}


def _assert_same(numpy_answers, general) -> None:
    for i, (a, b) in enumerate(zip(numpy_answers, general)):
        assert a == b, f"request {i}: the NumPy path answered {a}, the general path {b}"


# ------------------------------------------------------------------------------ tests
def test_without_a_transform_columns_go_straight_to_features_on_every_protocol(bundles, table):
    cols = ["id", *DIAMONDS_NUMERIC, *DIAMONDS_CATEGORICAL]
    rows = _records(table, cols, 0, 37)
    odd = [dict(r) for r in rows[:6]]
    odd[0]["carat"] = None  # imputed with the mean
    odd[1]["cut"] = "Not a cut"  # unseen: all zeros
    odd[2]["color"] = None  # missing: all zeros
    odd[3]["depth"] = 61  # an int in a float column
    del odd[4]["id"]  # an optional column some records lack
    odd[5]["extra"] = "ignored"
    frame = pd.DataFrame(rows[:5])
    requests = [
        _post("/predict?id=id", rows),
        _post("/predict", rows[:1]),
        _post("/predict", odd),
        _post("/predict", [{**rows[0], "cut": 3}]),  # a number in a text column: the general path's rules
        _post("/predict", [{k: v for k, v in rows[0].items() if k != "x"}]),  # a required field missing: 422
        _post("/predict", [{**rows[0], "y": "wide"}]),  # text in a number field: 422
        _post("/predict", frame.to_csv(index=False), **{"content-type": "text/csv"}),
        _post("/v2/models/plain/infer", {"inputs": v2_columns(frame)}),
        _post("/v1/models/plain:predict", {"instances": rows[:5]}),
        _post("/v1/models/plain:predict", {"inputs": frame.to_dict("list")}),
        _post("/invocations", {"dataframe_split": frame.to_dict("split") | {"index": None}}),
    ]
    numpy_answers, general, direct = _both(bundles["plain"], requests)
    _assert_same(numpy_answers, general)
    assert [s for s, _, _ in numpy_answers] == [200, 200, 200, 200, 422, 422, 200, 200, 200, 200, 200]
    assert direct >= 6  # every JSON request with text in text columns took the NumPy path
    b = load_bundle(bundles["plain"])
    expected = b.predict_frame(pd.DataFrame(rows))["prediction"].to_numpy()
    got = [r["prediction"] for r in json.loads(numpy_answers[0][2])]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_requests_sharing_a_batch_get_the_general_paths_answers(bundles, table):
    cols = [*DIAMONDS_NUMERIC, *DIAMONDS_CATEGORICAL]
    requests = [_post("/predict", _records(table, cols, 10 * i, 1 + i % 3)) for i in range(8)]
    numpy_answers, general, direct = _both(bundles["plain"], requests, concurrent=True)
    _assert_same(numpy_answers, general)
    assert all(s == 200 for s, _, _ in numpy_answers) and direct >= 1


def test_with_a_transform_the_features_come_from_its_frame(bundles, table):
    cols = ["id", *DIAMONDS_NUMERIC, *DIAMONDS_CATEGORICAL]
    rows = _records(table, cols, 100, 20)
    priced = _records(table, [*cols, "price"], 200, 3)  # the transform derives the target: dropped
    odd = [dict(r) for r in rows[:3]]
    odd[0]["z"] = None
    odd[1]["clarity"] = "??"
    requests = [
        _post("/predict?id=id", rows),
        _post("/predict", priced),
        _post("/predict", odd),
        _post("/predict", pd.DataFrame(rows[:4]).to_csv(index=False), **{"content-type": "text/csv"}),
        _post("/v1/models/transform:predict", {"instances": rows[:4]}),
    ]
    numpy_answers, general, direct = _both(bundles["transform"], requests)
    _assert_same(numpy_answers, general)
    assert all(s == 200 for s, _, _ in numpy_answers) and direct == 0
    b = load_bundle(bundles["transform"])
    expected = b.predict_frame(pd.DataFrame(rows))["prediction"].to_numpy()
    np.testing.assert_allclose([r["prediction"] for r in json.loads(numpy_answers[0][2])], expected, rtol=1e-6, atol=1e-6)


def test_refusals_of_the_preprocessor_are_the_general_paths_own(bundles, table):
    """missing="error" and infinite values: the NumPy path leaves such rows to the
    preprocessor, whose 422 names the row and the column."""
    import tritonclient.http as triton

    rows = _records(table, ["carat", "depth", "cut"], 0, 3)
    rows[2]["depth"] = None
    inputs = []
    for name, arr in (("carat", np.array([[0.3], [np.inf]])), ("depth", np.array([[61.0], [60.0]])),
                      ("cut", np.array([[b"Ideal"], [b"Good"]], dtype=object))):
        t = triton.InferInput(name, [2, 1], "BYTES" if arr.dtype == object else "FP64")
        t.set_data_from_numpy(arr)
        inputs.append(t)
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs)
    requests = [
        _post("/predict", rows),
        _post("/predict", rows[:2]),
        _post("/v2/models/strict/infer", body, **{"content-type": "application/octet-stream",
                                                 "inference-header-content-length": str(json_size)}),
    ]
    numpy_answers, general, _ = _both(bundles["strict"], requests)
    _assert_same(numpy_answers, general)
    assert [s for s, _, _ in numpy_answers] == [422, 200, 422]
    assert "record 2" in json.loads(numpy_answers[0][2])["error"].lower() or "row 2" in numpy_answers[0][2].decode()
    assert "infinite" in numpy_answers[2][2].decode()


@pytest.mark.parametrize("name", ["classes", "binary"])
def test_classifiers_answer_the_same_probabilities_and_labels(bundles, table, name):
    cols = ["carat", "depth", "price", "color", "clarity"] if name == "classes" else ["carat", "depth", "color"]
    rows = _records(table, cols, 300, 12)
    if name == "classes":
        rows[0]["price"] = 2.5  # an int64 feature: truncated as the frame's int column would
        rows[1]["price"] = None  # missing: a float column, imputed
        rows[2]["clarity"] = "unseen"  # integer code 0
    frame = pd.DataFrame(rows)
    requests = [_post("/predict", rows), _post(f"/v2/models/{name}/infer", {"inputs": v2_columns(frame.dropna())}),
                _post("/invocations", {"dataframe_records": rows})]
    numpy_answers, general, direct = _both(bundles[name], requests)
    _assert_same(numpy_answers, general)
    assert all(s == 200 for s, _, _ in numpy_answers) and direct >= 2
    labels = [r["label"] for r in json.loads(numpy_answers[0][2])]
    b = load_bundle(bundles[name])
    assert labels == b.predict_frame(frame)["label"].tolist() and all(isinstance(v, str) for v in labels)


def test_the_features_tensor_answers_as_before(bundles, table):
    b = load_bundle(bundles["plain"])
    X, _ = b.preprocessor.transform(table.iloc[:4])
    requests = [_post("/v2/models/plain/infer", {"inputs": [{"name": "features", "datatype": "FP32",
                                                            "shape": list(X.shape), "data": X.ravel().tolist()}]}),
                _post("/v1/models/plain:predict", {"signature_name": "features", "instances": X.tolist()})]
    numpy_answers, general, _ = _both(bundles["plain"], requests)
    _assert_same(numpy_answers, general)
    assert all(s == 200 for s, _, _ in numpy_answers)


@pytest.mark.parametrize("name", ["plain", "classes"])
def test_the_serving_forward_equals_predict_array(bundles, table, name):
    """The backend's forward bit for bit; the NumPy one (the plain bundle's small MLP) to float32 rounding."""
    b = load_bundle(bundles[name])
    X, _ = b.preprocessor.transform(table.iloc[:300])
    forward, ours = serving_forward(b, numpy=False), serving_forward(b)
    assert ours.kind == "numpy"  # classes: a functional model with named inputs and an embedding, in its graph's order
    for rows in (1, 7, 300):
        expected = b.predict_array(X[:rows], batch_size=rows)
        np.testing.assert_array_equal(forward(X[:rows]), expected)
        np.testing.assert_allclose(ours(X[:rows]), expected, rtol=1e-5, atol=1e-6)


def test_which_bundles_take_which_path(bundles):
    from daskml_scale.serving.inputs import InputSpec

    def spec(b):
        pre = b.preprocessor
        return InputSpec(b.input_schema, [*pre.numeric, *pre.categorical], target=pre.target)

    plain, transform = load_bundle(bundles["plain"]), load_bundle(bundles["transform"])
    assert fast_path_for(plain, spec(plain)).direct
    assert not fast_path_for(transform, spec(transform)).direct  # its columns go through the user's transform
    text_numbers = InputSpec({**plain.input_schema, "carat": "object"}, [*plain.preprocessor.numeric, "cut"])
    assert not fast_path_for(plain, text_numbers).direct  # a numeric feature sent as text: pandas converts it


def test_a_single_record_is_checked_as_every_record_is(bundles, table):
    """``check_records`` of one record takes a shorter way: the same columns, the same refusals."""
    from daskml_scale.serving.errors import RequestError
    from daskml_scale.serving.inputs import InputSpec

    b = load_bundle(bundles["plain"])
    pre = b.preprocessor
    spec = InputSpec(b.input_schema, [*pre.numeric, *pre.categorical], target=pre.target)
    good = _records(table, ["id", *DIAMONDS_NUMERIC, *DIAMONDS_CATEGORICAL], 0, 1)[0]
    cases = [good, {**good, "carat": None}, {k: v for k, v in good.items() if k != "id"}, {**good, "extra": [1]},
             {k: v for k, v in good.items() if k != "cut"}, {**good, "depth": "deep"}, {**good, "cut": True},
             {**good, "x": True}, {**good, "color": 7}]

    def outcome(records):
        try:
            return spec.check_records(records)
        except RequestError as exc:
            return exc.status, str(exc), exc.to_dict()

    for record in cases:
        one, two = outcome([record]), outcome([record, dict(record)])
        if isinstance(two, dict):
            assert one == {k: v[:1] for k, v in two.items()}, record
        else:
            assert one == two, record
    assert outcome([{k: v for k, v in good.items() if k != "cut"}])[0] == 422


def test_a_small_dense_model_answers_through_numpy_as_the_backend_does(bundles, table, tmp_path):
    """A ``keras.Sequential`` (or a functional chain) of Dense, Dropout and Activation layers
    is served by its NumPy form (``/info``: ``forward`` is ``numpy``), its answers equal to the
    backend's to float32 rounding; any other model, or ``numpy_forward=False``, calls the backend."""
    import keras

    from daskml_scale.backend.base import input_layout_of, split_inputs
    from daskml_scale.features import attach_layout
    from daskml_scale.serving.forward import NUMPY_MAX_PARAMETERS, numpy_forward

    b = load_bundle(bundles["plain"])
    width = b.preprocessor.n_features_
    rng = np.random.RandomState(0)
    X = (rng.randn(300, width) * 3).astype(np.float32)
    X_sent = X.copy()
    backend = serving_forward(b, numpy=False)
    assert serving_forward(b).kind == "numpy" and backend.kind == "backend"
    for act in ("linear", "relu", "sigmoid", "tanh", "softmax"):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dropout(0.5), keras.layers.Dense(8), keras.layers.Activation("tanh"),
                                  keras.layers.Dense(3, activation=act)])
        ours = numpy_forward(model)
        assert ours is not None, act
        expected = np.asarray(model.predict(X, verbose=0))
        for rows in (X[:1], X):
            np.testing.assert_allclose(ours(rows), expected[: len(rows)], rtol=1e-5, atol=1e-6, err_msg=act)
        assert np.array_equal(X, X_sent)  # the caller's X is not written

    class MyDense(keras.layers.Dense):
        pass

    inp = keras.Input((width,))
    others = {
        "a subclass of Dense": [MyDense(2)],
        "batch normalization": [keras.layers.BatchNormalization(), keras.layers.Dense(2)],
        "an activation it does not repeat": [keras.layers.Dense(2, activation="gelu")],
        "more weights than the bound": [keras.layers.Dense(NUMPY_MAX_PARAMETERS // width + 1)],
        "float16": [keras.layers.Dense(2, dtype="float16")],
    }
    for what, layers in others.items():
        assert numpy_forward(keras.Sequential([keras.Input((width,)), *layers])) is None, what
    # functional models, run in their graph's order: a chain, a layer applied twice, a branch
    # joined again, an Activation layer feeding two nodes (it must not write its input)
    twice = keras.layers.Dense(width, activation="tanh")
    shared = keras.layers.Activation("relu")(keras.layers.Dense(4)(inp))
    graphs = {
        "chain": keras.layers.Dense(2)(keras.layers.Dropout(0.2)(keras.layers.Dense(4, activation="relu")(inp))),
        "a layer applied twice": keras.layers.Dense(1)(twice(twice(inp))),
        "a branch": keras.layers.Dense(2)(keras.layers.Concatenate()([
            keras.layers.Dense(3, activation="sigmoid")(inp), keras.layers.Activation("tanh")(shared), shared])),
    }
    for what, out in graphs.items():
        model = keras.Model(inp, out)
        ours = numpy_forward(model)
        assert ours is not None, what
        np.testing.assert_allclose(ours(X), model.predict(X, verbose=0), rtol=1e-5, atol=1e-6, err_msg=what)
        assert np.array_equal(X, X_sent), what
    not_repeated = {
        "a layer it does not repeat": keras.layers.Dense(1)(keras.layers.LayerNormalization()(inp)),
        "two outputs": [keras.layers.Dense(1)(inp), keras.layers.Dense(1)(inp)],
        "an op outside the layers": keras.layers.Dense(1)(keras.ops.square(inp)),
    }
    for what, out in not_repeated.items():
        assert numpy_forward(keras.Model(inp, out)) is None, what
    # the named inputs of model_inputs: a masked embedding is the backend's
    pre = b.preprocessor.__class__(target="price", numeric=["carat"], categorical=["cut", "color"],
                                   categorical_encoding={"color": "int"}).fit(table)
    inputs, features = daskml_scale.model_inputs(pre, embedding_dims=2)
    coded = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(5, activation="relu")(features)))
    attach_layout(coded, pre)
    Xc, _ = pre.transform(table.iloc[:50])
    ours = numpy_forward(coded)
    assert ours is not None
    np.testing.assert_allclose(ours(Xc), coded.predict(split_inputs(input_layout_of(coded), Xc), verbose=0),
                               rtol=1e-5, atol=1e-6)
    masked_in = {"numeric": keras.Input((pre.n_features_ - 1,), name="numeric"), "color": keras.Input((1,), name="color", dtype="int32")}
    emb = keras.layers.Flatten()(keras.layers.Embedding(len(pre.categories_["color"]) + 1, 2, mask_zero=True)(masked_in["color"]))
    masked = keras.Model(masked_in, keras.layers.Dense(1)(keras.layers.Concatenate()([masked_in["numeric"], emb])))
    attach_layout(masked, pre)
    assert numpy_forward(masked) is None

    rows = _records(table, [*DIAMONDS_NUMERIC, *DIAMONDS_CATEGORICAL], 0, 40)
    expected = b.predict_frame(pd.DataFrame(rows))["prediction"].to_numpy()

    async def go(**options):
        app = create_app(bundles["plain"], **options)
        async with served(app) as c:
            info = (await c.get("/info")).json()["serving"]["forward"]
            got = [(await c.post("/predict", json=[r])).json()[0]["prediction"] for r in rows]
        return info, got

    for options, kind in (({}, "numpy"), ({"numpy_forward": False}, "backend")):
        info, got = asyncio.run(go(**options))
        assert info == kind
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    # the bundle of model_inputs (named inputs, an embedding, a classifier) served through NumPy
    frame = table[["carat", "depth", "price", "color", "clarity"]].iloc[:30]
    classes = load_bundle(bundles["classes"])
    want = classes.predict_frame(frame)

    async def classify():
        async with served(create_app(bundles["classes"])) as c:
            info = (await c.get("/info")).json()["serving"]["forward"]
            got = [(await c.post("/predict", json=[r])).json()[0] for r in frame.to_dict("records")]
        return info, got

    info, got = asyncio.run(classify())
    assert info == "numpy"
    assert [g["label"] for g in got] == want["label"].tolist()
    probs = [c for c in want.columns if c != "label"]
    np.testing.assert_allclose([[g[c] for c in probs] for g in got], want[probs].to_numpy(), rtol=1e-5, atol=1e-6)
