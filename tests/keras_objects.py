"""Custom Keras objects as a user's script defines them, for tests/test_custom_objects.py.

A pinball (quantile) loss, a metric and a layer registered with
``@keras.saving.register_keras_serializable``; an activation that is not registered
(Keras saves it under its ``__name__``); a pandas transform. The tests also load this
file's source under other names (a module the workers cannot import, or ``__main__``
as in a notebook), with ``PACKAGE`` changed so that the registered names differ.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
from keras import ops

PACKAGE = "daskml_test"
QUANTILE = 0.7


@keras.saving.register_keras_serializable(package=PACKAGE)
def pinball(y_true, y_pred):
    err = ops.reshape(ops.cast(y_true, "float32"), (-1,)) - ops.reshape(y_pred, (-1,))
    return ops.maximum(QUANTILE * err, (QUANTILE - 1.0) * err)


def _abs_error(y_true, y_pred):
    return ops.abs(ops.reshape(ops.cast(y_true, "float32"), (-1,)) - ops.reshape(y_pred, (-1,)))


@keras.saving.register_keras_serializable(package=PACKAGE)
class AbsError(keras.metrics.MeanMetricWrapper):
    def __init__(self, name: str = "abs_error", dtype=None) -> None:
        super().__init__(fn=_abs_error, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Affine(keras.layers.Layer):
    """``x * scale + shift``, one trainable pair per feature."""

    def build(self, input_shape) -> None:
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")
        self.shift = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="shift")

    def call(self, x):
        return x * self.scale + self.shift


def leaky_tanh(x):  # not registered: found through the model's config and the live model
    return ops.tanh(x) + 0.01 * x


def transform(df: pd.DataFrame) -> pd.DataFrame:
    """The user's pandas code (as ``daskml_scale.datasets.diamonds_transform``)."""
    out = df.copy()
    out["volume"] = out["x"] * out["y"] * out["z"]
    if "price" in out.columns:
        out["log_price"] = np.log(out["price"].astype("float64"))
    return out


def build_model(n_features: int, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((n_features,)), Affine(), keras.layers.Dense(16, activation=leaky_tanh), keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=pinball, metrics=[AbsError()])
    return model
