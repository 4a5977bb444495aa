"""The Keras model an estimator trains: the user's (copied), their build function's, or a small MLP."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

from daskml_scale.exceptions import ArgumentError

__all__ = ["build_model", "default_model", "set_learning_rate"]


def default_model(
    n_features: int, *, task: str = "regression", n_classes: int | None = None, hidden: tuple[int, ...] = (64, 64),
    activation: str = "relu", seed: int | None = None,
) -> Any:
    """An MLP ``Dense(hidden...) -> output`` compiled with Adam(1e-3): one linear output and
    MSE for a regression; one sigmoid output and binary cross-entropy for two classes;
    a softmax and sparse categorical cross-entropy for more. Initialized from ``seed``."""
    import keras

    base = 0 if seed is None else int(seed)
    layers: list[Any] = [keras.Input((n_features,))]
    for i, units in enumerate(hidden):
        init = keras.initializers.GlorotUniform(seed=base + i)
        layers.append(keras.layers.Dense(int(units), activation=activation, kernel_initializer=init))
    init = keras.initializers.GlorotUniform(seed=base + len(hidden))
    if task == "regression":
        out, loss = keras.layers.Dense(1, kernel_initializer=init), "mse"
    elif n_classes == 2:
        out, loss = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init), "binary_crossentropy"
    else:
        out = keras.layers.Dense(int(n_classes or 2), activation="softmax", kernel_initializer=init)
        loss = "sparse_categorical_crossentropy"
    model = keras.Sequential([*layers, out])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return model


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_model(
    spec: Any, *, n_features: int, task: str, n_classes: int | None, kwargs: dict[str, Any] | None, seed: int | None
) -> Any:
    """A new compiled model for one fit, from the estimator's ``model`` parameter.

    Raises
    ------
    ArgumentError
        A classification with fewer than two classes; ``model_kwargs`` with a model
        object; a build function that does not return a compiled Keras model.
    """
    if task == "classification" and (n_classes or 0) < 2:
        raise ArgumentError(
            f"Expected y with at least 2 classes to train a classifier. Received: {n_classes or 0} class(es)"
        )
    kwargs = dict(kwargs or {})
    if spec is None:
        return default_model(n_features, task=task, n_classes=n_classes, seed=seed, **kwargs)
    if hasattr(spec, "get_weights") and hasattr(spec, "compile"):
        if kwargs:
            raise ArgumentError(
                f"Expected model_kwargs=None with a Keras model (they go to a build function). Received: {kwargs}"
            )
        return copy.deepcopy(spec)  # the estimator's parameter stays as it was given
    if not callable(spec):
        raise ArgumentError(
            "Expected model to be a compiled Keras model, a function build_model(n_features, ...) returning one, "
            f"or None. Received: {type(spec).__name__}"
        )
    if task == "classification" and _accepts(spec, "n_classes"):
        kwargs.setdefault("n_classes", n_classes)
    model = spec(n_features, **kwargs)
    if getattr(model, "optimizer", None) is None:
        raise ArgumentError(
            f"Expected the build function {getattr(spec, '__qualname__', spec)!r} to return a compiled Keras model. "
            f"Received: {type(model).__name__} without an optimizer; call model.compile(optimizer=..., loss=...)"
        )
    return model


def set_learning_rate(model: Any, learning_rate: float) -> None:
    """Set the learning rate of the model's optimizer (a float rate, not a schedule)."""
    import keras

    current = model.optimizer.learning_rate
    if isinstance(current, keras.optimizers.schedules.LearningRateSchedule):
        raise ArgumentError(
            "Expected an optimizer with a float learning rate to set learning_rate=. Received: a schedule; "
            "leave learning_rate=None"
        )
    model.optimizer.learning_rate = learning_rate
