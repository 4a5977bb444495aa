"""A model on the preprocessor's features: named inputs and embeddings.

:func:`model_inputs` builds the Keras inputs a fitted :class:`~daskml_scale.Preprocessor`
feeds, and the usual first layers on them: the dense block as it is, and an
``Embedding`` per integer-coded categorical (``categorical_encoding="int"``), the way
Keras's ``FeatureSpace`` pairs an ``"int"`` lookup with an embedding::

    pre = Preprocessor(target="arr_delay", numeric=[...], categorical=["dest", "tailnum"],
                       categorical_encoding="int", max_categories=5000).fit(ddf)
    inputs, features = daskml_scale.model_inputs(pre, embedding_dims={"tailnum": 16})
    hidden = keras.layers.Dense(64, activation="relu")(features)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))

Any model whose input names are those of :func:`daskml_scale.encoding.input_layout`
(``"numeric"`` and one per coded column) works in ``fit``, ``predict``, bundles and
``serve``; a model with one input takes the whole matrix, as before.
:func:`attach_layout` is what those paths call to pair the model with the features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from daskml_scale.backend.base import set_input_layout
from daskml_scale.encoding import DENSE_INPUT, InputSlot, input_layout
from daskml_scale.exceptions import ArgumentError, BundleError

__all__ = ["model_inputs", "attach_layout", "default_embedding_dim"]


def default_embedding_dim(vocabulary_size: int) -> int:
    """A width that grows slowly with the vocabulary: about ``1.6 * n ** 0.56``, at most 32."""
    return int(max(2, min(32, round(1.6 * vocabulary_size**0.56))))


def model_inputs(pre: Any, *, embedding_dims: int | Mapping[str, int] | None = None) -> tuple[dict[str, Any], Any]:
    """``(inputs, features)`` for a fitted preprocessor.

    Parameters
    ----------
    pre : Preprocessor
        Fitted.
    embedding_dims : int or dict, optional
        The width of each coded column's embedding (one number for all, or per column);
        by default :func:`default_embedding_dim` of its vocabulary size.

    Returns
    -------
    inputs : dict of str to keras.KerasTensor
        ``"numeric"`` (float32, the dense block) and one ``int32`` input per coded
        column: pass it to ``keras.Model(inputs, outputs)``.
    features : keras.KerasTensor
        The dense block and every embedding (flattened), concatenated: the tensor to put
        the model's first hidden layer on.
    """
    import keras

    layout = input_layout(pre)
    sizes = pre.vocabulary_sizes_
    if isinstance(embedding_dims, Mapping):
        unknown = sorted(set(embedding_dims) - set(sizes))
        if unknown:
            raise ArgumentError(
                f"Expected embedding_dims to name integer-coded columns {sorted(sizes)}. Received: {unknown}"
            )
    inputs: dict[str, Any] = {}
    parts = []
    for slot in layout:
        if slot.name == DENSE_INPUT and slot.name not in sizes:
            inputs[slot.name] = keras.Input((slot.width,), name=slot.name, dtype="float32")
            parts.append(inputs[slot.name])
            continue
        vocab = sizes[slot.name]
        if isinstance(embedding_dims, Mapping):
            dim = embedding_dims.get(slot.name) or default_embedding_dim(vocab)
        else:
            dim = embedding_dims or default_embedding_dim(vocab)
        inputs[slot.name] = keras.Input((1,), name=slot.name, dtype="int32")
        emb = keras.layers.Embedding(vocab, int(dim), name=f"{slot.name}_embedding")(inputs[slot.name])
        parts.append(keras.layers.Flatten(name=f"{slot.name}_flat")(emb))
    features = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="features")(parts)
    return inputs, features


def _inputs(model: Any) -> list[Any] | None:
    try:
        return list(model.inputs or []) or None
    except (AttributeError, ValueError):  # e.g. a Sequential model without an Input, not built yet
        return None


def _model_input_shapes(model: Any) -> dict[str, tuple[Any, ...]] | None:
    """Input name -> shape of a built model with named inputs; None for one input."""
    tensors = _inputs(model)
    if not tensors or len(tensors) < 2:
        return None
    struct = getattr(model, "_inputs_struct", None)  # a functional model's inputs as given: a dict is keyed by name
    if isinstance(struct, Mapping):
        return {str(k): tuple(t.shape) for k, t in struct.items()}
    return {str(t.name): tuple(t.shape) for t in tensors}


def attach_layout(model: Any, pre: Any, *, error: type[Exception] = BundleError) -> tuple[InputSlot, ...] | None:
    """Pair ``model`` with ``pre``'s features: a model with several inputs gets the
    layout that cuts ``X`` into them (:func:`daskml_scale.backend.base.set_input_layout`);
    a model with one input takes ``X`` whole. Checks the names and widths, and raises
    ``error`` naming what does not match."""
    layout = input_layout(pre)
    shapes = _model_input_shapes(model)
    if shapes is None:
        set_input_layout(model, None)
        tensors = _inputs(model)
        in_shape = tuple(tensors[0].shape) if tensors else None
        if in_shape is not None and in_shape[-1] is not None and in_shape[-1] != pre.n_features_:
            named = ""
            if len(layout) > 1:
                named = (f"; or give the model one input per name in {[s.name for s in layout]} "
                         "(see daskml_scale.model_inputs)")
            raise error(
                f"Expected the model to take the preprocessor's {pre.n_features_} features{named}. "
                f"Received: a model with input shape {in_shape}."
            )
        return None
    names = {s.name for s in layout}
    missing, unexpected = sorted(names - set(shapes)), sorted(set(shapes) - names)
    if missing or unexpected:
        raise error(
            f"Expected the model's inputs to be named {sorted(names)} (the preprocessor's features: "
            f"{DENSE_INPUT!r} for the numeric block and one per integer-coded categorical). "
            f"Received: inputs {sorted(shapes)}"
            + (f"; missing {missing}" if missing else "") + (f"; unexpected {unexpected}" if unexpected else "")
            + ". daskml_scale.model_inputs(preprocessor) builds matching inputs."
        )
    fitted = []
    for slot in layout:
        shape = shapes[slot.name]
        squeeze = len(shape) == 1
        width = 1 if squeeze else shape[-1]
        if width is not None and width != slot.width:
            raise error(
                f"Expected the model's input {slot.name!r} to take {slot.width} column(s). "
                f"Received: an input of shape {shape}."
            )
        fitted.append(dataclasses.replace(slot, squeeze=squeeze))
    set_input_layout(model, fitted)
    return tuple(fitted)
