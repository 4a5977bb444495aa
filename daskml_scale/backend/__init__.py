"""The one seam between daskml_scale and the Keras backend.

:func:`current` returns the :class:`Backend` of the backend Keras runs on in this
process (``KERAS_BACKEND``; TensorFlow by default). Training, bundles, prediction,
serving and the worker plugin call it and see NumPy arrays; no other module of the
package imports TensorFlow. The module-level functions below are shorthands for the
current backend's methods.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from daskml_scale.backend.base import (
    Backend,
    BackendUnsupportedError,
    TrainFn,
    input_layout_of,
    model_from_bytes,
    model_to_bytes,
    pack,
    set_input_layout,
    split_inputs,
    assign_values,
    unpack,
)

__all__ = [
    "Backend",
    "BackendUnsupportedError",
    "current",
    "name",
    "model_to_bytes",
    "model_from_bytes",
    "pack",
    "unpack",
    "set_input_layout",
    "input_layout_of",
    "split_inputs",
    "assign_values",
    "ensure_built",
    "build_model",
    "get_weights",
    "set_weights",
    "get_optimizer_state",
    "set_optimizer_state",
    "reset_metrics",
    "metric_state",
    "metric_results",
    "make_train_fn",
    "make_eval_fn",
    "make_packed_train_fn",
    "optimizer_variables",
    "make_gradient_loop_fn",
    "make_apply_fn",
    "make_fused_step_fn",
    "compiled_forward",
]

_BACKENDS: dict[str, Backend] = {}


def name() -> str:
    """The Keras backend of this process, without importing Keras when it is not loaded yet."""
    if "keras" in sys.modules:
        return str(sys.modules["keras"].backend.backend())
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def current() -> Backend:
    """The :class:`Backend` for :func:`name` (made once per process)."""
    key = name()
    impl = _BACKENDS.get(key)
    if impl is None:
        if key == "tensorflow":
            from daskml_scale.backend.tensorflow import TensorFlowBackend

            impl = TensorFlowBackend()
        elif key == "jax":
            from daskml_scale.backend.jax import JaxBackend

            impl = JaxBackend()
        else:
            impl = Backend()
            impl.name = key
        _BACKENDS[key] = impl
    return impl


# ----------------------------------------------------- shorthands for current()
def ensure_built(model: Any, X: np.ndarray, y: np.ndarray) -> None:
    current().ensure_built(model, X, y)


def build_model(model: Any, X: np.ndarray) -> None:
    current().build_model(model, X)


def get_weights(model: Any) -> list[np.ndarray]:
    return current().get_weights(model)


def set_weights(model: Any, weights: list[np.ndarray]) -> None:
    current().set_weights(model, weights)


def get_optimizer_state(model: Any) -> list[np.ndarray]:
    return current().get_optimizer_state(model)


def set_optimizer_state(model: Any, state: list[np.ndarray]) -> None:
    current().set_optimizer_state(model, state)


def reset_metrics(model: Any) -> None:
    current().reset_metrics(model)


def metric_state(model: Any) -> list[list[np.ndarray]]:
    return current().metric_state(model)


def metric_results(model: Any, state: list[list[np.ndarray]]) -> dict[str, float]:
    return current().metric_results(model, state)


def make_train_fn(model: Any) -> TrainFn:
    return current().make_train_fn(model)


def make_eval_fn(model: Any) -> TrainFn:
    return current().make_eval_fn(model)


def make_packed_train_fn(model: Any, variables: Sequence[Any]) -> Callable[..., np.ndarray]:
    return current().make_packed_train_fn(model, variables)


def optimizer_variables(model: Any) -> list[Any]:
    return current().optimizer_variables(model)


def make_gradient_loop_fn(model: Any) -> Callable[..., tuple[Any, list[list[np.ndarray]]]]:
    return current().make_gradient_loop_fn(model)


def make_apply_fn(model: Any) -> Callable[[Any], Any]:
    return current().make_apply_fn(model)


def make_fused_step_fn(model: Any) -> Callable[..., Any]:
    return current().make_fused_step_fn(model)


def compiled_forward(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    return current().compiled_forward(model)
