"""Which search trials can train together as one stacked program, read from their built models.

Two trials share a *pack* when their built Keras models have the same architecture
shape and differ at most in settings that the stacked program
(:class:`~daskml_scale.backend.tf_stacked.TrialStackTrainer`) holds per trial:

* the optimizer's constants: the learning rate, Adam's ``beta_1``, ``beta_2`` and
  ``epsilon``, SGD's ``momentum`` (the optimizer's class and SGD's ``nesterov`` are shared);
* the rate of every ``Dropout`` layer;
* the L1/L2 penalties of every ``Dense`` layer's kernel and bias (``keras.regularizers.L1``,
  ``L2``, ``L1L2``; which weights have a regularizer is shared).

Everything else must be equal: the chain of layers (``Dense`` widths, biases and
activations, the elementwise layers and their configuration), the input width, the
loss and its configuration. The chain rules are those of ``fit_groups``
(:mod:`daskml_scale.groups.spec`). A model is not stacked (it trains alone, as it would
without stacking) when it is not such a chain, computes metrics besides its loss, uses a
custom loss or activation function (two of them cannot be told apart), a learning-rate
schedule, mixed precision, named inputs, or when Keras does not run on TensorFlow.
:func:`describe` says which, and why not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from daskml_scale.groups.spec import STACKABLE_LAYERS, LayerStep, StackSpec, _chain, _loss_fn, _optimizer

__all__ = ["Stackable", "describe"]

_SHARED_OPTIMIZER = ("name", "nesterov")
_IGNORED_CONFIG = ("name", "trainable", "seed", "rate", "kernel_regularizer", "bias_regularizer",
                   "kernel_initializer", "bias_initializer")


@dataclass
class Stackable:
    """A built trial model as the stacked program sees it.

    ``key`` is equal for two models exactly when they can share a pack; ``settings`` are
    the trial's own values (``learning_rate``, ..., ``dropout`` per Dropout step, ``l1``/``l2``
    per weight); ``spec`` is the chain for the trainer."""

    key: str
    spec: StackSpec
    settings: dict[str, Any] = field(default_factory=dict)
    penalized: list[int] = field(default_factory=list)  # the weights with a regularizer


def _keras_function(fn: Any) -> bool:
    return fn is None or str(getattr(fn, "__module__", "")).startswith("keras")


def _penalty(reg: Any) -> tuple[tuple[float, float] | None, str]:
    """``(l1, l2)`` of a Keras L1/L2/L1L2 regularizer (``(0, 0)`` for none), or why not."""
    import keras

    if reg is None:
        return (0.0, 0.0), ""
    kind = type(reg)
    if kind is keras.regularizers.L1:
        return (float(reg.l1), 0.0), ""
    if kind is keras.regularizers.L2:
        return (0.0, float(reg.l2)), ""
    if kind is keras.regularizers.L1L2:
        return (float(reg.l1), float(reg.l2)), ""
    return None, f"the regularizer {kind.__name__} (stacking supports L1, L2 and L1L2)"


def _loss_key(model: Any) -> tuple[str | None, str]:
    import keras

    loss = model.loss
    if isinstance(loss, str):
        return f"name:{loss}", ""
    if isinstance(loss, keras.losses.Loss):
        if not _keras_function(type(loss)):
            return None, f"the loss {type(loss).__name__} is not one of Keras's"
        cfg = {k: v for k, v in loss.get_config().items() if k != "name"}
        return f"{type(loss).__name__}:{json.dumps(cfg, sort_keys=True, default=str)}", ""
    if callable(loss) and _keras_function(loss):
        return f"fn:{loss.__module__}.{getattr(loss, '__name__', loss)}", ""
    return None, "the loss is a custom function (two of them cannot be told apart; use a keras.losses.Loss)"


def describe(model: Any, layout: Any = None) -> tuple[Stackable | None, str]:
    """``(Stackable, "")`` for a compiled, built trial model that can train in a pack, else
    ``(None, reason)``."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None, f"stacking runs on the TensorFlow backend (Keras runs on {keras.backend.backend()})"
    if layout:
        return None, "the model has named inputs"
    cfg = getattr(getattr(model, "_compile_config", None), "config", None) or {}
    if cfg.get("metrics") or cfg.get("weighted_metrics"):
        return None, "the model computes metrics besides its loss"
    layers, why = _chain(model)
    if layers is None:
        return None, why
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 2 or shape[-1] is None:
        return None, f"the model's input has shape {shape} (stacking needs (None, features))"
    positions = {id(w): i for i, w in enumerate(model.weights)}
    n_weights = len(model.weights)
    l1, l2 = [0.0] * n_weights, [0.0] * n_weights
    penalized: list[int] = []
    steps: list[LayerStep] = []
    described: list[Any] = []
    dropout: list[float] = []
    width = int(shape[-1])
    for layer in layers:
        kind = type(layer).__name__
        if kind not in STACKABLE_LAYERS:
            return None, f"layer {layer.name!r} is a {kind} (stackable layers: {', '.join(STACKABLE_LAYERS)})"
        policy = getattr(getattr(layer, "dtype_policy", None), "name", "float32")
        if policy != "float32":
            return None, f"layer {layer.name!r} computes in {policy} (stacking needs float32)"
        layer_cfg = {k: v for k, v in layer.get_config().items() if k not in _IGNORED_CONFIG}
        if kind == "Dense":
            if any(getattr(layer, a, None) is not None for a in ("activity_regularizer", "kernel_constraint",
                                                                   "bias_constraint")):
                return None, f"layer {layer.name!r} has an activity regularizer or a constraint"
            if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
                return None, f"layer {layer.name!r} is LoRA-enabled or quantized"
            if not _keras_function(layer.activation):
                return None, f"layer {layer.name!r} has a custom activation function"
            k = positions.get(id(layer.kernel), -1)
            b = positions.get(id(layer.bias), -1) if layer.use_bias else -1
            if k < 0 or (layer.use_bias and b < 0):
                return None, f"layer {layer.name!r}'s weights are not the model's"
            for index, reg in ((k, layer.kernel_regularizer), (b, getattr(layer, "bias_regularizer", None))):
                pen, why = _penalty(reg)
                if pen is None:
                    return None, f"layer {layer.name!r}: {why}"
                if index >= 0:
                    l1[index], l2[index] = pen
                    if reg is not None:
                        penalized.append(index)
            steps.append(LayerStep("dense", units=int(layer.units), activation=layer.activation, kernel=k, bias=b))
            width = int(layer.units)
        elif kind == "Dropout":
            if getattr(layer, "noise_shape", None) is not None:
                return None, f"layer {layer.name!r} has a noise_shape"
            steps.append(LayerStep("dropout", rate=float(layer.rate), name="dropout"))
            dropout.append(float(layer.rate))
        else:
            if kind == "Activation" and not _keras_function(getattr(layer, "activation", None)):
                return None, f"layer {layer.name!r} has a custom activation function"
            steps.append(LayerStep("elementwise", layer=layer, name=kind))
        described.append([kind, layer_cfg])
    covered = {i for s in steps for i in (s.kernel, s.bias) if i >= 0}
    if len(covered) != n_weights:
        return None, "the model has weights outside its Dense layers"
    loss_key, why = _loss_key(model)
    if loss_key is None:
        return None, why
    loss_fn, why = _loss_fn(model)
    if loss_fn is None:
        return None, why
    opt, why = _optimizer(model)
    if opt is None:
        return None, why
    shared = {k: opt[k] for k in _SHARED_OPTIMIZER if k in opt}
    settings = {k: v for k, v in opt.items() if k not in _SHARED_OPTIMIZER}
    settings.update({"dropout": dropout, "l1": l1, "l2": l2})
    shapes = [tuple(int(d) for d in w.shape) for w in model.weights]
    key = json.dumps({"layers": described, "shapes": shapes, "loss": loss_key, "optimizer": shared,
                      "input": int(shape[-1]), "penalized": penalized}, sort_keys=True, default=str)
    spec = StackSpec(n_features=int(shape[-1]), n_outputs=width, steps=steps, weight_shapes=shapes, loss=loss_fn,
                     optimizer=dict(shared), key=key)
    return Stackable(key=key, spec=spec, settings=settings, penalized=penalized), ""
