"""The model call of a served batch: ``X -> outputs``, one model call per batch.

The backend's compiled forward (:func:`daskml_scale.backend.compiled_forward`; under
TensorFlow its one trace called directly, without the per-call lookup of a
``tf.function``), without :meth:`Bundle.predict_array`'s cutting into batches: a served
batch is already at most ``serve.max-batch-rows`` rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.bundle import Bundle

__all__ = ["serving_forward"]

Forward = Callable[[np.ndarray], np.ndarray]


def serving_forward(bundle: "Bundle") -> Forward:
    """``X -> outputs`` of the bundle's model for whole batches (one model call each).

    Parameters
    ----------
    bundle : Bundle
        A plain bundle; its model is loaded here.

    Returns
    -------
    callable
        float32 ``(rows, n_features)`` in, NumPy ``(rows, width)`` out.
    """
    from daskml_scale import backend

    forward = backend.compiled_forward(bundle.model)

    def call(X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.empty((0, 0), dtype=np.float32)
        return np.asarray(forward(np.asarray(X, dtype=np.float32))).reshape(len(X), -1)

    return call
