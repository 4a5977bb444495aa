"""Which Keras models can be trained stacked: the architecture as a plain description.

Many models of one architecture train together as ONE compiled program when the
architecture is a chain of layers whose math is a batched matrix product or an
elementwise function. :func:`stack_plan` reads a compiled Keras model and returns a
:class:`StackSpec` (the layers, the loss, the optimizer) or the reason it cannot.

Stackable today:

* layers: ``InputLayer``, ``Dense`` (on a 2-D input, any activation, with or without
  a bias, no regularizer or constraint), ``Activation``, ``ReLU``, ``LeakyReLU``,
  ``ELU``, ``Softmax``, ``Identity`` and ``Dropout`` (dropout draws its own masks:
  a stacked fit then matches a separate fit in distribution only), in a
  ``Sequential`` model or a functional model that is a single chain;
* losses: any Keras loss with the default reduction (``"sum_over_batch_size"``),
  given by name, as a function or as a ``keras.losses.Loss``; one loss, no loss
  weights;
* optimizers: ``SGD`` (with or without momentum, Nesterov) and ``Adam`` (no AMSGrad)
  with a constant learning rate and no weight decay, clipping, EMA, loss scaling or
  gradient accumulation.

Anything else (BatchNormalization, embeddings, several inputs, learning-rate
schedules, ...) trains through the loop mode: one traced step function reused for
every group, the group's weights passed in.

This module reads Keras objects only; the compiled program is the backend's
(:meth:`daskml_scale.backend.base.Backend.make_stacked_trainer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["StackSpec", "LayerStep", "stack_plan", "STACKABLE_LAYERS"]

STACKABLE_LAYERS = ("InputLayer", "Dense", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Identity", "Dropout")
_ELEMENTWISE = ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Identity")
_ADAM_DEFAULTS = {"weight_decay": None, "clipnorm": None, "global_clipnorm": None, "clipvalue": None,
                  "use_ema": False, "loss_scale_factor": None, "gradient_accumulation_steps": None, "amsgrad": False}


@dataclass
class LayerStep:
    """One step of the chain: ``"dense"`` (weights ``kernel``/``bias`` at positions of
    ``model.weights``), ``"elementwise"`` (a weightless Keras layer, called as is) or
    ``"dropout"``."""

    kind: str
    units: int = 0
    activation: Callable[[Any], Any] | None = None
    kernel: int = -1
    bias: int = -1
    layer: Any = None
    rate: float = 0.0
    name: str = ""


@dataclass
class StackSpec:
    """A stackable architecture: its chain, loss and optimizer.

    ``weight_shapes`` are the shapes of ``model.weights`` (one group); the stacked
    program holds each as ``(groups, *shape)``.
    """

    n_features: int
    n_outputs: int
    steps: list[LayerStep]
    weight_shapes: list[tuple[int, ...]]
    loss: Callable[[Any, Any], Any]
    optimizer: dict[str, Any]
    key: str = ""
    description: dict[str, Any] = field(default_factory=dict)


def _loss_fn(model: Any) -> tuple[Callable[[Any, Any], Any] | None, str]:
    """The model's loss as a per-sample function ``(y_true, y_pred) -> losses``, or why not."""
    import keras

    loss = model.loss
    if isinstance(loss, (list, tuple, dict)):
        return None, f"the model has several losses ({loss!r})"
    if getattr(model, "_compile_config", None) is not None:
        cfg = model._compile_config.config
        if cfg.get("loss_weights") is not None:
            return None, "the model was compiled with loss_weights"
    if isinstance(loss, keras.losses.Loss):
        if getattr(loss, "reduction", "sum_over_batch_size") != "sum_over_batch_size":
            return None, f"the loss reduction is {loss.reduction!r} (stacking supports 'sum_over_batch_size')"
        return loss.call, type(loss).__name__
    if isinstance(loss, str) or callable(loss):
        fn = keras.losses.get(loss)
        if isinstance(fn, keras.losses.Loss):
            return fn.call, type(fn).__name__
        if callable(fn):
            name = getattr(fn, "__name__", str(loss))

            def per_sample(y_true: Any, y_pred: Any) -> Any:
                # what Keras's LossFunctionWrapper does before calling a loss function (Keras has
                # no public name for it; the stacked program passes y with the rank of y_pred anyway)
                try:
                    from keras.src.losses.loss import squeeze_or_expand_to_same_rank
                except ImportError:  # pragma: no cover - a Keras that moved it
                    return fn(y_true, y_pred)
                y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
                return fn(y_true, y_pred)

            return per_sample, name
    return None, f"the loss {loss!r} is not a Keras loss"


def _optimizer(model: Any) -> tuple[dict[str, Any] | None, str]:
    import keras

    opt = model.optimizer
    cfg = opt.get_config()
    if not isinstance(cfg.get("learning_rate"), (int, float)):
        return None, "the learning rate is a schedule"
    lr = float(keras.ops.convert_to_numpy(opt.learning_rate))
    if type(opt) is keras.optimizers.Adam:
        bad = [k for k, v in _ADAM_DEFAULTS.items() if cfg.get(k, v) != v]
        if bad:
            return None, f"the Adam optimizer sets {bad}"
        return {"name": "adam", "learning_rate": lr, "beta_1": float(cfg["beta_1"]), "beta_2": float(cfg["beta_2"]),
                "epsilon": float(cfg["epsilon"])}, ""
    if type(opt) is keras.optimizers.SGD:
        bad = [k for k, v in _ADAM_DEFAULTS.items() if k != "amsgrad" and cfg.get(k, v) != v]
        if bad:
            return None, f"the SGD optimizer sets {bad}"
        return {"name": "sgd", "learning_rate": lr, "momentum": float(cfg.get("momentum", 0.0)),
                "nesterov": bool(cfg.get("nesterov", False))}, ""
    return None, f"the optimizer is {type(opt).__name__} (stacking supports Adam and SGD)"


def _chain(model: Any) -> tuple[list[Any] | None, str]:
    """The model's layers in order when they form one chain from one input to one output."""
    import keras

    if len(getattr(model, "inputs", None) or []) != 1 or len(getattr(model, "outputs", None) or []) != 1:
        return None, "the model does not have exactly one input and one output"
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if not isinstance(model, keras.Sequential):
        prev = model.inputs[0]
        for layer in layers:
            try:
                if layer.input is not prev:
                    return None, f"layer {layer.name!r} is not fed by the layer before it (not a single chain)"
            except (AttributeError, ValueError):
                return None, f"layer {layer.name!r} is used more than once"
            prev = layer.output
        if prev is not model.outputs[0]:
            return None, "the model's output is not its last layer's"
    return layers, ""


def stack_plan(model: Any, *, for_training: bool = True) -> tuple[StackSpec | None, str]:
    """``(spec, "")`` when ``model`` (compiled and built) can be trained stacked, else
    ``(None, reason)``; the reason names the layer, loss or optimizer in the way.

    ``for_training=False``: only the forward pass is needed (prediction): the model
    need not be compiled, and the spec has no loss or optimizer."""
    layers, why = _chain(model)
    if layers is None:
        return None, why
    positions = {id(w): i for i, w in enumerate(model.weights)}
    covered: set[int] = set()
    steps: list[LayerStep] = []
    width = int(model.inputs[0].shape[-1]) if model.inputs[0].shape[-1] is not None else -1
    if len(model.inputs[0].shape) != 2 or width < 1:
        return None, f"the model's input has shape {tuple(model.inputs[0].shape)} (stacking needs (None, features))"
    n_features = width
    for layer in layers:
        kind = type(layer).__name__
        if kind not in STACKABLE_LAYERS:
            return None, f"layer {layer.name!r} is a {kind} (stackable layers: {', '.join(STACKABLE_LAYERS)})"
        if kind == "Dense":
            if any(getattr(layer, a, None) is not None for a in (
                "kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint", "bias_constraint"
            )):
                return None, f"layer {layer.name!r} has a regularizer or a constraint"
            if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
                return None, f"layer {layer.name!r} is LoRA-enabled or quantized"
            k = positions.get(id(layer.kernel), -1)
            b = positions.get(id(layer.bias), -1) if layer.use_bias else -1
            if k < 0 or (layer.use_bias and b < 0):
                return None, f"layer {layer.name!r}'s weights are not the model's"
            covered.update(i for i in (k, b) if i >= 0)
            steps.append(LayerStep("dense", units=int(layer.units), activation=layer.activation, kernel=k, bias=b,
                                   name=getattr(layer.activation, "__name__", "activation")))
            width = int(layer.units)
        elif kind == "Dropout":
            if getattr(layer, "noise_shape", None) is not None:
                return None, f"layer {layer.name!r} has a noise_shape"
            steps.append(LayerStep("dropout", rate=float(layer.rate), name="dropout"))
        else:
            steps.append(LayerStep("elementwise", layer=layer, name=kind))
    trainable = {id(w) for w in model.trainable_weights}
    extra = [w for i, w in enumerate(model.weights) if i not in covered]
    if any(id(w) in trainable for w in extra):
        return None, "the model has trainable weights outside its Dense layers"
    if extra:
        return None, f"the model has weights outside its Dense layers ({[w.path for w in extra]})"
    if not for_training:
        return StackSpec(n_features=n_features, n_outputs=width, steps=steps,
                         weight_shapes=[tuple(w.shape) for w in model.weights], loss=_no_loss, optimizer={}), ""
    loss, loss_name = _loss_fn(model)
    if loss is None:
        return None, loss_name
    opt, why = _optimizer(model)
    if opt is None:
        return None, why
    description = {
        "layers": [{"kind": s.kind, "units": s.units, "activation": s.name, "rate": s.rate} for s in steps],
        "loss": loss_name, "optimizer": opt, "n_features": n_features, "n_outputs": width,
        "loss_config": _loss_config(model),
    }
    key = json.dumps(description, sort_keys=True, default=str)
    return StackSpec(
        n_features=n_features, n_outputs=width, steps=steps, weight_shapes=[tuple(w.shape) for w in model.weights],
        loss=loss, optimizer=opt, key=key, description=description,
    ), ""


def _no_loss(y_true: Any, y_pred: Any) -> Any:  # pragma: no cover - a forward-only spec never trains
    raise RuntimeError("A forward-only StackSpec has no loss")


def _loss_config(model: Any) -> Any:
    loss = model.loss
    get_config = getattr(loss, "get_config", None)
    try:
        return get_config() if callable(get_config) else str(getattr(loss, "__name__", loss))
    except Exception:  # noqa: BLE001  (a description only)
        return repr(loss)
