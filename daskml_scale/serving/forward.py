"""The model call of a served batch: ``X -> outputs``, one model call per batch.

Two ways, chosen once when the bundle is loaded (``/info`` says which:
``serving.forward``):

* **NumPy** (``"numpy"``), for a small ``keras.Sequential`` (or a functional chain of
  one input and one output, see :func:`numpy_forward`) made only of ``Dense``
  layers (float32, not quantized, no LoRA), ``Dropout`` and ``Activation`` layers,
  with the activations ``linear``, ``relu``, ``sigmoid``, ``tanh`` and ``softmax``:
  the same arithmetic in NumPy on the layers' weights, read once. A call into the
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

    A functional model (``keras.Model(inputs, outputs)``) of one input and one output
    made of the same layers qualifies when its layers, in order, are a chain: checked
    by running both on a few made-up rows (a layer applied twice, or a branch, makes
    them differ).
    """
    import keras

    functional = type(model) is _functional_class()
    if type(model) is not keras.Sequential and not functional:
        return None
    if functional:
        inputs, outputs = getattr(model, "inputs", None) or [], getattr(model, "outputs", None) or []
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 2:
            return None
    acts = _activations()
    steps: list[tuple[np.ndarray | None, np.ndarray | None, Callable[[np.ndarray], np.ndarray] | None]] = []
    count = 0
    width = None
    for layer in model.layers:
        kind = type(layer)
        if kind is keras.layers.Dropout or kind is keras.layers.InputLayer:
            continue
        if getattr(layer, "dtype_policy", None) is None or layer.dtype_policy.name != "float32":
            return None
        if kind is keras.layers.Activation:
            if layer.activation not in acts:
                return None
            steps.append((None, None, acts[layer.activation]))
            continue
        if kind is not keras.layers.Dense or layer.activation not in acts:
            return None
        if getattr(layer, "quantization_mode", None) is not None or getattr(layer, "lora_enabled", False):
            return None
        kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float32)
        if kernel.ndim != 2 or (width is not None and kernel.shape[0] != width):
            return None
        bias = np.asarray(keras.ops.convert_to_numpy(layer.bias), dtype=np.float32) if layer.use_bias else None
        count += kernel.size + (0 if bias is None else bias.size)
        width = kernel.shape[1]
        steps.append((kernel, bias, acts[layer.activation]))
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

    if functional and not _same_on_made_up_rows(model, forward):
        return None
    return forward


def _same_on_made_up_rows(model: Any, forward: Forward) -> bool:
    """Whether ``forward`` gives what the model itself gives on a few seeded random rows."""
    import keras

    width = model.inputs[0].shape[-1]
    if not width:
        return False
    X = (np.random.default_rng(0).standard_normal((8, int(width))) * 2).astype(np.float32)
    try:
        expected = np.asarray(keras.ops.convert_to_numpy(model(X, training=False)), dtype=np.float32)
        got = forward(X)
    except Exception:  # noqa: BLE001  (any failure: the backend's way)
        return False
    return got.shape == expected.shape and bool(np.allclose(got, expected, rtol=1e-4, atol=1e-5))
