"""The prediction columns of a model, for its preprocessor's task.

* A regression answers ``prediction`` (``prediction_0``, ... for several outputs).
* A classification answers ``proba_<class>`` for every class and ``label``, the most
  probable class (a string). With two classes (a text target with two labels, or a
  0/1 integer target under ``Preprocessor(task="auto")``), a model with a single
  sigmoid output gives the probability of the second class; the first is one minus it.

:func:`check_model` checks a model against a fitted preprocessor before training (the
CLI calls it) and when a bundle is saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from daskml_scale.exceptions import BundleError
from daskml_scale.features import attach_layout
from daskml_scale.preprocessing import Preprocessor

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["check_model", "output_names_for", "output_meta", "outputs_to_frame"]


def _output_width(model: "keras.Model") -> int:
    outputs = model.outputs if getattr(model, "outputs", None) else None
    if outputs is None or len(outputs) != 1:
        n = "no known" if outputs is None else str(len(outputs))
        raise BundleError(
            f"Expected a built model with exactly one output tensor. Received: a model with {n} outputs. "
            "Build the model (call it once, or give it an Input) and concatenate multiple heads into one output."
        )
    shape = tuple(outputs[0].shape)
    return int(np.prod([d for d in shape[1:] if d is not None])) if len(shape) > 1 else 1


def output_names_for(preprocessor: Preprocessor, width: int) -> tuple[str, list[str]]:
    """(task, output column names) for a model with ``width`` outputs.

    A classification answers ``proba_<class>`` per class and ``label`` (the most
    probable class); with two classes, a single (sigmoid) output is the probability
    of the second class.
    """
    classes = getattr(preprocessor, "classes_", None)
    if classes is not None:
        if width not in (len(classes), 1) or (width == 1 and len(classes) != 2):
            raise BundleError(
                f"Expected a classifier with one output per class ({len(classes)}: {classes}) or a single "
                f"sigmoid output for two classes. Received: a model with {width} outputs."
            )
        return "classification", [f"proba_{c}" for c in classes] + ["label"]
    if width == 1:
        return "regression", ["prediction"]
    return "regression", [f"prediction_{i}" for i in range(width)]


def _output_activation(model: "keras.Model") -> str | None:
    """The name of the activation that makes the model's output, when a layer shows it."""
    history = getattr(model.outputs[0], "_keras_history", None) if getattr(model, "outputs", None) else None
    layer = history[0] if history else (model.layers[-1] if getattr(model, "layers", None) else None)
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None)


def check_model(model: "keras.Model", preprocessor: Preprocessor) -> tuple[str, list[str], int]:
    """(task, output names, output width) of ``model`` for the fitted ``preprocessor``.

    Call it before training to fail early; :func:`save_bundle` calls it too.

    Raises
    ------
    BundleError
        The preprocessor is not fitted; the model does not take its features; its
        outputs do not fit the task (a classifier needs one output per class, or one
        sigmoid output for two classes).
    """
    if not hasattr(preprocessor, "feature_names_"):
        raise BundleError("Expected a fitted Preprocessor. Received: an unfitted one; call preprocessor.fit(data) first.")
    width = _output_width(model)
    task, names = output_names_for(preprocessor, width)
    if task == "classification" and width == 1 and _output_activation(model) == "linear":
        classes = preprocessor.classes_
        assert classes is not None
        why = (
            " (task='auto' takes an integer target with two values as classes)"
            if getattr(preprocessor, "task", "auto") == "auto" else ""
        )
        raise BundleError(
            f"Expected the model's single output to be the probability of class {classes[1]!r} "
            f"(a last layer Dense(1, activation='sigmoid')): the target {preprocessor.target!r} is a classification "
            f"with classes {classes}{why}. Received: a model with a linear output. End the model with a sigmoid, "
            "or pass Preprocessor(task='regression') to predict the target as a number."
        )
    attach_layout(model, preprocessor)  # the model takes the features, whole or by named inputs
    return task, names, width


def output_meta(task: str, names: list[str], classes: list[str] | None) -> pd.DataFrame:
    """A zero-row frame with the prediction columns and their dtypes."""
    cols: dict[str, pd.Series] = {n: pd.Series([], dtype="float32") for n in names}
    if task == "classification":
        cols["label"] = pd.Series([], dtype="str")
    return pd.DataFrame(cols)


def outputs_to_frame(
    out: np.ndarray, index: pd.Index, task: str, names: list[str], classes: list[str] | None
) -> pd.DataFrame:
    """Model outputs ``(rows, width)`` as the prediction columns, on ``index``."""
    n = len(index)
    if n == 0:
        meta = output_meta(task, names, classes)
        meta.index = index
        return meta
    out = np.asarray(out, dtype=np.float32).reshape(n, -1)
    if task == "classification":
        assert classes is not None
        if out.shape[1] == 1 and len(classes) == 2:
            out = np.concatenate([1.0 - out, out], axis=1)
        cols = {name: out[:, j] for j, name in enumerate(names[:-1])}
        labels = np.asarray(classes, dtype=object)[np.argmax(out, axis=1)]
        cols["label"] = pd.array(labels, dtype="str")
        return pd.DataFrame(cols, index=index)
    return pd.DataFrame({name: out[:, j] for j, name in enumerate(names)}, index=index)
