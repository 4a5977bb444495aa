"""The model call of a served batch: ``X -> outputs``, one model call per batch.

Two ways, chosen once when the bundle is loaded (``/info`` says which:
``serving.forward``):

* **NumPy** (``"numpy"``), for a small ``keras.Sequential``, or a functional model of
  one output (run node by node in its graph's order, see :func:`numpy_forward`), made
  only of ``Dense`` layers (float32, not quantized, no LoRA), ``Dropout`` and
  ``Activation`` layers, with the activations ``linear``, ``relu``, ``sigmoid``,
  ``tanh`` and ``softmax``, and, in a functional model, ``Embedding`` (not masked),
  ``Flatten`` and ``Concatenate``: the named inputs and embeddings of
  :func:`daskml_scale.model_inputs` included. The same arithmetic in NumPy on the
  layers' weights, read once. A call into the
  backend costs ~0.25 ms whatever the batch (TensorFlow's executor, measured here on
  a 3-layer MLP; the NumPy product of one row takes ~7 us), which is a sixth of a
  single client's request. The outputs equal the backend's to float32 rounding
  (a relative ~1e-7: the order of the sums differs), as the backend's own outputs
  differ between batch sizes. Up to :data:`NUMPY_MAX_PARAMETERS` weights (larger
  models are worth the backend's kernels, or a GPU);
* **the backend's compiled forward** (``"backend"``, :func:`daskml_scale.backend.compiled_forward`;
  under TensorFlow its one trace called directly, without the per-call lookup of a
  ``tf.function``) for every other model.

Neither cuts the batch as :meth:`Bundle.predict_array` does: a served batch is already
at most ``serve.max-batch-rows`` rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.bundle import Bundle

__all__ = ["NUMPY_MAX_PARAMETERS", "numpy_forward", "serving_forward"]

Forward = Callable[[np.ndarray], np.ndarray]

#: the most weights a model served by the NumPy forward may have
NUMPY_MAX_PARAMETERS = 1_000_000


def serving_forward(bundle: "Bundle", numpy: bool = True) -> Forward:
    """``X -> outputs`` of the bundle's model for whole batches (one model call each).

    Parameters
    ----------
    bundle : Bundle
        A plain bundle; its model is loaded here.
    numpy : bool
        ``False``: the backend's forward, whatever the model.

    Returns
    -------
    callable
        float32 ``(rows, n_features)`` in, NumPy ``(rows, width)`` out; its ``kind``
        attribute is ``"numpy"`` or ``"backend"`` (see the module's text).
    """
    from daskml_scale import backend

    forward = numpy_forward(bundle.model) if numpy else None
    kind = "numpy"
    if forward is None:
        forward, kind = backend.compiled_forward(bundle.model), "backend"

    def call(X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.empty((0, 0), dtype=np.float32)
        return np.asarray(forward(np.asarray(X, dtype=np.float32))).reshape(len(X), -1)

    call.kind = kind  # type: ignore[attr-defined]
    return call


def _activations() -> dict[Any, Callable[[np.ndarray], np.ndarray] | None]:
    """Keras activation function -> its NumPy form on a float32 array, in place where it can."""
    import keras

    def sigmoid(h: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # exp(-x) of a large negative x: inf, and 1 / inf = 0
            np.negative(h, out=h)
            np.exp(h, out=h)
            h += 1.0
            return np.reciprocal(h, out=h)

    def softmax(h: np.ndarray) -> np.ndarray:
        h -= h.max(axis=-1, keepdims=True)
        np.exp(h, out=h)
        h /= h.sum(axis=-1, keepdims=True)
        return h

    a = keras.activations
    return {
        a.linear: None,
        a.relu: lambda h: np.maximum(h, 0.0, out=h),
        a.sigmoid: sigmoid,
        a.tanh: lambda h: np.tanh(h, out=h),
        a.softmax: softmax,
    }


def _functional_class() -> type | None:
    """Keras's class of models built by calling layers on ``keras.Input`` (not exported)."""
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover - another Keras layout
        return None
    return Functional


def numpy_forward(model: Any) -> Forward | None:
    """The NumPy form of ``model``'s inference call, or ``None`` where the model is not
    one this module can repeat exactly (see the module's text).

    A ``keras.Sequential`` is a chain of its layers. A functional model
    (``keras.Model(inputs, outputs)``, one output) is run node by node in its graph's
    order (:func:`_graph_forward`): a branch, a layer applied twice, or the named inputs
    and embeddings of :func:`daskml_scale.model_inputs` (``Embedding``, ``Flatten``,
    ``Concatenate``) are repeated as Keras runs them, and the result is checked once
    against the model on a few made-up rows.
    """
    import keras

    if type(model) is _functional_class():
        return _graph_forward(model)
    if type(model) is not keras.Sequential:
        return None
    acts = _activations()
    steps: list[tuple[np.ndarray | None, np.ndarray | None, Callable[[np.ndarray], np.ndarray] | None]] = []
    count = 0
    width = None
    for layer in model.layers:
        kind = type(layer)
        if kind is keras.layers.Dropout or kind is keras.layers.InputLayer:
            continue
        if not _float32(layer):
            return None
        if kind is keras.layers.Activation:
            if layer.activation not in acts:
                return None
            steps.append((None, None, acts[layer.activation]))
            continue
        dense = _dense(layer, acts)
        if dense is None or (width is not None and dense[0].shape[0] != width):
            return None
        kernel, bias, act = dense
        count += kernel.size + (0 if bias is None else bias.size)
        width = kernel.shape[1]
        steps.append((kernel, bias, act))
    if not any(k is not None for k, _, _ in steps) or count > NUMPY_MAX_PARAMETERS:
        return None

    def forward(X: np.ndarray) -> np.ndarray:
        h = X
        for kernel, bias, act in steps:
            if kernel is not None:
                h = h @ kernel  # a new array: the caller's X is never written
                if bias is not None:
                    h += bias
            elif h is X:
                h = h.copy()
            if act is not None:
                h = act(h)
        return h

    return forward


def _float32(layer: Any) -> bool:
    policy = getattr(layer, "dtype_policy", None)
    return policy is not None and policy.name == "float32"


def _dense(layer: Any, acts: dict) -> tuple[np.ndarray, np.ndarray | None, Any] | None:
    """A plain float32 ``Dense`` layer's (kernel, bias, NumPy activation), else ``None``."""
    import keras

    if type(layer) is not keras.layers.Dense or layer.activation not in acts or not _float32(layer):
        return None
    if getattr(layer, "quantization_mode", None) is not None or getattr(layer, "lora_enabled", False):
        return None
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float32)
    if kernel.ndim != 2:
        return None
    bias = np.asarray(keras.ops.convert_to_numpy(layer.bias), dtype=np.float32) if layer.use_bias else None
    return kernel, bias, acts[layer.activation]


def _node_function(layer: Any, acts: dict) -> tuple[Callable[..., np.ndarray], int, int] | None:
    """``(f, weights, embedding rows)`` for one layer of a functional graph: ``f`` maps
    the layer's input arrays to its output without writing them (an input may feed
    other nodes too); ``None`` for a layer this module does not repeat."""
    import keras

    kind = type(layer)
    if kind is keras.layers.Dropout:
        return (lambda x: x), 0, 0
    if not _float32(layer):
        return None
    if kind is keras.layers.Activation:
        if layer.activation not in acts:
            return None
        act = acts[layer.activation]
        return ((lambda x: x.copy()) if act is None else (lambda x: act(x.copy()))), 0, 0
    if kind is keras.layers.Flatten:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return None
        return (lambda x: x.reshape(len(x), -1)), 0, 0
    if kind is keras.layers.Concatenate:
        axis = layer.axis
        return (lambda *xs: np.concatenate(xs, axis=axis)), 0, 0
    if kind is keras.layers.Embedding:
        if layer.mask_zero or getattr(layer, "quantization_mode", None) is not None or getattr(layer, "lora_enabled", False):
            return None
        table = np.asarray(keras.ops.convert_to_numpy(layer.embeddings), dtype=np.float32)
        if table.ndim != 2:
            return None
        return (lambda codes: table[np.asarray(codes, dtype=np.intp)]), table.size, table.shape[0]
    dense = _dense(layer, acts)
    if dense is None:
        return None
    kernel, bias, act = dense

    def f(x: np.ndarray) -> np.ndarray:
        h = x @ kernel  # a new array: x is never written
        if bias is not None:
            h += bias
        return h if act is None else act(h)

    return f, kernel.size + (0 if bias is None else bias.size), 0


def _graph_forward(model: Any) -> Forward | None:
    """A functional model's NumPy form: its nodes in Keras's own order (deepest first),
    each a :func:`_node_function`; its inputs cut from ``X`` by the model's input layout
    (:func:`daskml_scale.backend.base.split_inputs`), as the backend's forward cuts them.
    ``None`` when a layer, a call or the inputs are anything else, or when the result on
    made-up rows differs from the model's."""
    from daskml_scale.backend.base import input_layout_of, split_inputs

    inputs, outputs = list(getattr(model, "inputs", None) or []), list(getattr(model, "outputs", None) or [])
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if not inputs or len(outputs) != 1 or not isinstance(nodes_by_depth, dict):
        return None
    layout = input_layout_of(model)
    if layout:
        struct = getattr(model, "_inputs_struct", None)
        if not isinstance(struct, dict) or set(struct) != {s.name for s in layout}:
            return None
        feeds = [(s.name, id(struct[s.name])) for s in layout]
    elif len(inputs) == 1 and len(inputs[0].shape) == 2:
        feeds = [(None, id(inputs[0]))]
    else:
        return None
    acts = _activations()
    plan: list[tuple[Callable[..., np.ndarray], list[int], int]] = []
    count, rows_min = 0, None
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.is_input:
                continue
            args, kwargs = node.arguments.args, node.arguments.kwargs
            # ``training`` is recorded for Dropout; serving calls with training=False whatever it says
            if set(kwargs) - {"training"} or len(args) != 1 or len(node.outputs) != 1:
                return None
            arg = args[0]
            given = list(arg) if isinstance(arg, (list, tuple)) else [arg]
            if [id(t) for t in given] != [id(t) for t in node.input_tensors]:
                return None  # a constant or a nested structure among the arguments
            made = _node_function(node.operation, acts)
            if made is None:
                return None
            f, weights, rows = made
            count += weights
            if rows:
                rows_min = rows if rows_min is None else min(rows_min, rows)
            plan.append((f, [id(t) for t in given], id(node.outputs[0])))
    if not plan or count > NUMPY_MAX_PARAMETERS:
        return None
    out_id = id(outputs[0])

    def forward(X: np.ndarray) -> np.ndarray:
        if layout:
            parts = split_inputs(layout, X)
            values = {key: parts[name] for name, key in feeds}
        else:
            values = {feeds[0][1]: X}
        for f, ins, out in plan:
            values[out] = f(*[values[i] for i in ins])
        return values[out_id]

    check = _made_up_rows(model, layout, rows_min)
    if check is None or not _same_on(model, forward, check, layout):
        return None
    return forward


def _made_up_rows(model: Any, layout: Any, codes: int | None) -> np.ndarray | None:
    """A few seeded random rows of the model's ``X``: numbers, and codes below ``codes``
    (the smallest embedding) in the integer columns of its layout."""
    rng = np.random.default_rng(0)
    if layout:
        width = max(s.stop for s in layout)
    else:
        width = model.inputs[0].shape[-1]
    if not width:
        return None
    X = (rng.standard_normal((8, int(width))) * 2).astype(np.float32)
    for s in layout or ():
        if s.dtype != "float32":
            X[:, s.start : s.stop] = rng.integers(0, max(int(codes or 1), 1), size=(8, s.stop - s.start))
    return X


def _same_on(model: Any, forward: Forward, X: np.ndarray, layout: Any) -> bool:
    """Whether ``forward(X)`` is what the model itself gives for ``X``."""
    import keras

    from daskml_scale.backend.base import split_inputs

    try:
        expected = np.asarray(keras.ops.convert_to_numpy(model(split_inputs(layout, X), training=False)), dtype=np.float32)
        got = forward(X)
    except Exception:  # noqa: BLE001  (any failure: the backend's way)
        return False
    return got.shape == expected.shape and bool(np.allclose(got, expected, rtol=1e-4, atol=1e-5))
