"""The contract between daskml_scale and a Keras backend.

Everything the package does that depends on the backend (TensorFlow today; JAX or
PyTorch next) goes through one :class:`Backend`: compiled train / eval / gradient /
optimizer loops for training, a compiled forward pass for prediction and serving,
thread pools and GPU memory for workers. The rest of the package sees NumPy arrays.

The defaults here are plain Keras 3 calls, correct on any backend but not fast; a
backend module overrides what it can compile. Methods a backend does not support yet
raise :class:`BackendUnsupportedError`, which names the backend and the missing piece.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from daskml_scale.exceptions import ArgumentError, DaskmlScaleError

__all__ = [
    "Backend", "BackendUnsupportedError", "pack", "unpack", "model_to_bytes", "model_from_bytes",
    "set_input_layout", "input_layout_of", "split_inputs", "assign_values",
]

TrainFn = Callable[[np.ndarray, np.ndarray, int], int]


class BackendUnsupportedError(DaskmlScaleError, NotImplementedError):
    """The active Keras backend has no implementation of a daskml_scale feature yet."""


# ------------------------------------------------------------- backend-free helpers
def model_to_bytes(model: Any) -> bytes:
    """The model (architecture, weights, compile config) as ``.keras`` bytes."""
    import keras

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.keras")
        keras.saving.save_model(model, path)
        with open(path, "rb") as f:
            return f.read()


def model_from_bytes(data: bytes, *, safe_mode: bool = True, compile: bool = True) -> Any:
    """A model from :func:`model_to_bytes`'s bytes (``safe_mode`` as in ``keras.saving.load_model``)."""
    import keras

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)


def pack(arrays: Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """float32 arrays as one flat vector: one message frame instead of one per array
    (a round trip to an actor is ~0.35 ms shorter for a small MLP). Other dtypes: the list."""
    if arrays and all(np.asarray(a).dtype == np.float32 for a in arrays):
        return np.concatenate([np.ravel(a) for a in arrays])
    return list(arrays)


def unpack(packed: np.ndarray | Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """The inverse of :func:`pack` (views into the vector); a list passes through."""
    if not isinstance(packed, np.ndarray):
        return list(packed)
    sizes = [int(np.prod(s)) for s in shapes]
    if sum(sizes) != packed.size:
        raise ArgumentError(f"Expected {sum(sizes)} packed values for shapes {list(shapes)}. Received: {packed.size}")
    out, at = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(packed[at : at + size].reshape(shape))
        at += size
    return out


def assign_values(variables: Sequence[Any], values: Sequence[np.ndarray]) -> None:
    """Set each variable to its value, cast to the variable's dtype (an integer variable,
    e.g. a ``Normalization`` layer's count, carried in a float32 vector is rounded)."""
    for v, value in zip(variables, values):
        dtype = np.dtype(getattr(v.dtype, "name", v.dtype))
        value = np.asarray(value)
        if dtype.kind in "iub" and value.dtype.kind == "f":
            value = np.rint(value)
        v.assign(value.astype(dtype, copy=False))


# ------------------------------------------------------------- named model inputs
_LAYOUT = "_daskml_input_layout"


def set_input_layout(model: Any, layout: Sequence[Any] | None) -> None:
    """Record how ``X`` (one float32 matrix) is cut into ``model``'s named inputs: a
    sequence of :class:`daskml_scale.encoding.InputSlot`, or ``None`` for a model that
    takes ``X`` whole. Every compiled function of a backend reads it when it is made."""
    object.__setattr__(model, _LAYOUT, None if layout is None else tuple(layout))  # not a tracked Keras attribute


def input_layout_of(model: Any) -> tuple[Any, ...] | None:
    return getattr(model, _LAYOUT, None)


def split_inputs(layout: Sequence[Any] | None, x: Any) -> Any:
    """``x`` cut into the model's inputs by ``layout`` (columns ``[start, stop)`` each,
    cast to the input's dtype, squeezed for a rank-1 input); ``x`` itself without a
    layout. Works on NumPy arrays and, inside a compiled function, on tensors."""
    if not layout:
        return x
    if isinstance(x, np.ndarray):
        cast = lambda part, dtype: part.astype(dtype)  # noqa: E731
    else:
        import keras

        cast = keras.ops.cast
    out = {}
    for s in layout:
        part = x[:, s.start] if s.squeeze else x[:, s.start : s.stop]
        out[s.name] = part if s.dtype == "float32" else cast(part, s.dtype)
    return out


# ------------------------------------------------------------------- the contract
class Backend:
    """One Keras backend's implementation of what daskml_scale needs.

    Subclasses set :attr:`name` (Keras's name for the backend) and override the
    ``make_*`` factories; the state accessors have working defaults.
    """

    name: str = "keras"

    def _unsupported(self, what: str) -> BackendUnsupportedError:
        return BackendUnsupportedError(
            f"{what} is not implemented for the Keras backend {self.name!r} yet. "
            "Use KERAS_BACKEND=tensorflow (the default) on the driver and on every worker."
        )

    # -------------------------------------------------------------- process setup
    def worker_environ(self, threads: int, log_level: int) -> dict[str, str]:
        """Environment variables to set in a worker before the backend starts."""
        return {"KERAS_BACKEND": self.name}

    def configure_threads(
        self, threads: int, *, inter_op: int | None = None, gpu_memory_growth: bool = True
    ) -> dict[str, Any]:
        """Size the backend's thread pools (``inter_op``: default ``min(2, threads)``) and
        GPU memory growth, before the backend starts; returns what was applied."""
        return {"intra_op": threads, "inter_op": None, "gpus": []}

    def effective_threads(self) -> dict[str, int | None]:
        """The thread pool sizes the backend reports now (``None``: it does not say)."""
        return {"intra_op": None, "inter_op": None}

    def versions(self) -> dict[str, str | None]:
        """Versions of the backend's libraries, for a bundle's metadata."""
        return {}

    # ---------------------------------------------------------------------- state
    def build_model(self, model: Any, X: np.ndarray) -> None:
        """Build the model and its optimizer's slots for rows like ``X`` (the metrics are
        :meth:`ensure_built`'s part)."""
        if not model.built and not input_layout_of(model):
            model.build((None,) + tuple(X.shape[1:]))
        opt = model.optimizer
        if opt is not None and not opt.built:
            opt.build(model.trainable_variables)

    def ensure_built(self, model: Any, X: np.ndarray, y: np.ndarray) -> None:
        """Build the model, its optimizer's slots and its metrics on a sample batch, so
        every state list (weights, optimizer, metrics) has its final length."""
        self.build_model(model, X)
        layout = input_layout_of(model)
        if not getattr(model, "_daskml_metrics_built", False):
            # one eager test step creates the metrics' variables: no graph to trace here
            model.test_step((split_inputs(layout, X[:1]), y[:1]))
            self.reset_metrics(model)
            model._daskml_metrics_built = True

    def get_weights(self, model: Any) -> list[np.ndarray]:
        return [np.asarray(v) for v in model.get_weights()]

    def set_weights(self, model: Any, weights: list[np.ndarray]) -> None:
        if len(model.weights) != len(weights):
            raise ArgumentError(f"Expected {len(model.weights)} weight arrays. Received: {len(weights)}")
        model.set_weights(weights)

    @staticmethod
    def optimizer_variables(model: Any) -> list[Any]:
        opt = model.optimizer
        return list(opt.variables) if opt is not None else []

    def get_optimizer_state(self, model: Any) -> list[np.ndarray]:
        return [np.asarray(v.numpy()) for v in self.optimizer_variables(model)]

    def set_optimizer_state(self, model: Any, state: list[np.ndarray]) -> None:
        variables = self.optimizer_variables(model)
        self._check_optimizer_state(variables, state)
        for v, s in zip(variables, state):
            v.assign(s)

    @staticmethod
    def _check_optimizer_state(variables: list[Any], state: list[np.ndarray]) -> None:
        if len(variables) != len(state):
            raise ArgumentError(
                f"Expected {len(variables)} optimizer variables. Received: {len(state)} "
                "(was the model compiled with another optimizer?)"
            )

    def reset_metrics(self, model: Any) -> None:
        for m in model.metrics:
            m.reset_state()

    def metric_state(self, model: Any) -> list[list[np.ndarray]]:
        """The state variables of every metric (sums and counts for the usual ones)."""
        return [[np.asarray(v.numpy()) for v in m.variables] for m in model.metrics]

    def metric_results(self, model: Any, state: list[list[np.ndarray]]) -> dict[str, float]:
        """Load summed metric state into the model's metrics and read their results."""
        for m, values in zip(model.metrics, state):
            for v, s in zip(m.variables, values):
                v.assign(np.asarray(s, dtype=v.dtype))
        logs: dict[str, float] = {}
        for m in model.metrics:
            r = m.result()  # wait-bounded: a Keras metric's value, not a future
            if isinstance(r, dict):
                for k, v in r.items():
                    logs[k] = float(np.asarray(v))
            else:
                logs[m.name] = float(np.asarray(r))
        return logs

    # ---------------------------------------------------------------- compiled loops
    def make_train_fn(self, model: Any) -> TrainFn:
        """``fn(X, y, batch_size) -> steps``: ``model.train_step`` per batch, compiled."""
        raise self._unsupported("Distributed training (a compiled train loop)")

    def make_packed_train_fn(self, model: Any, variables: Sequence[Any]) -> Callable[..., np.ndarray]:
        """``fn(X, y, batch_size, state) -> values``: a round of local SGD in one call
        (AllReduce, ``every > 1``). ``state`` (one flat float32 vector of ``variables``'
        values in order, or None to leave them) is assigned first, then
        ``model.train_step`` runs per batch of ``(X, y)``, and the variables' values
        after come back as one flat float32 vector.

        This version composes the backend's own pieces (an assignment per variable, the
        train loop, a read per variable); a backend may compile the whole round as one
        program, as the TensorFlow backend does."""
        train = self.make_train_fn(model)
        shapes = [tuple(v.shape) for v in variables]

        def call(X: np.ndarray, y: np.ndarray, batch_size: int, state: np.ndarray | None) -> np.ndarray:
            if state is not None:
                assign_values(variables, unpack(state, shapes))
            if len(X):
                train(X, y, batch_size)
            return np.concatenate([np.ravel(np.asarray(v.numpy(), dtype=np.float32)) for v in variables])

        return call

    def make_eval_fn(self, model: Any) -> TrainFn:
        """``fn(X, y, batch_size) -> steps``: ``model.test_step`` per batch (metrics accumulate)."""
        raise self._unsupported("Distributed validation (a compiled eval loop)")

    def make_gradient_loop_fn(self, model: Any) -> Callable[..., tuple[Any, list[list[np.ndarray]]]]:
        """``fn(X, y, batch_size, weights) -> (gradients, metric_state)`` (the parameter server)."""
        raise self._unsupported("The parameter server's gradient loop")

    def make_apply_fn(self, model: Any) -> Callable[[Any], Any]:
        """``fn(gradients) -> weights``: one optimizer step (the parameter server)."""
        raise self._unsupported("The parameter server's optimizer step")

    def make_fused_step_fn(self, model: Any) -> Callable[..., Any]:
        """``fn(X, y, prev) -> grads``: apply the last step's mean gradients, then the
        gradient on a new batch, in one call (AllReduce with ``every=1``)."""
        raise self._unsupported("AllReduce's fused step")

    def make_stacked_trainer(self, spec: Any) -> Any:
        """Many models of one stackable architecture (:class:`daskml_scale.groups.spec.StackSpec`)
        trained as one compiled program: stacked weights, one optimizer state per group."""
        raise self._unsupported("Training many models as one stacked program (fit_groups)")

    def make_stacked_forward(self, spec: Any, weights: Sequence[np.ndarray]) -> Callable[..., np.ndarray]:
        """``fn(X, codes) -> outputs``: each row through the stacked weights of group ``codes[i]``."""
        raise self._unsupported("Prediction with stacked group weights (fit_groups)")

    def compiled_forward(self, model: Any) -> Callable[[np.ndarray], np.ndarray]:
        """``x -> model(x, training=False)``, NumPy in and out (prediction, serving)."""
        import keras

        layout = input_layout_of(model)
        return lambda x: keras.ops.convert_to_numpy(model(split_inputs(layout, x), training=False))
