"""The JAX implementation of :class:`~daskml_scale.backend.base.Backend`.

Keras 3 on JAX is stateless underneath: a model's ``train_step(state, data)`` takes
and returns its variables' values. Every loop here reads the values from the model's
variables, runs ONE jitted XLA program over many batches (``lax.fori_loop``), and
writes the values back, so the rest of the package sees the same mutable model as on
TensorFlow.

Retracing is bounded: the full batches of a call are one ``lax.scan`` over ``X`` cut
into batches and padded to a bucket (a power of two of batches; the padded ones are
skipped by a ``cond``), with the number of steps a traced value, so arrays of many
lengths share a few programs; a last, partial batch is one jitted step per distinct
size (XLA's own cache).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from daskml_scale.backend.base import Backend, TrainFn, input_layout_of, split_inputs, unpack
from daskml_scale.exceptions import ArgumentError

__all__ = ["JaxBackend"]


def _values(variables: list[Any]) -> list[Any]:
    return [v.value for v in variables]


def _assign(variables: list[Any], values: list[Any]) -> None:
    for v, x in zip(variables, values):
        v.assign(x)


def _bucket(steps: int) -> int:
    """The padded number of batches for ``steps`` full batches: the next power of two."""
    return 1 << max(0, int(steps - 1).bit_length())


class _Loop:
    """A jitted ``step(state, xb, yb) -> state`` run over every batch of ``X``."""

    def __init__(self, model: Any, step: Callable[[Any, Any, Any], Any]) -> None:
        import jax

        self.model = model
        layout = input_layout_of(model)
        self.inputs = lambda x: split_inputs(layout, x)

        def full(state, Xb, yb, steps):
            # a scan over the batches (a while loop slicing one big X copies it each step on
            # CPU); the padded batches past `steps` are skipped by a cond, not computed
            def body(state, batch):
                i, xb, yb_ = batch
                return jax.lax.cond(i < steps, lambda s: step(s, xb, yb_), lambda s: s, state), None

            state, _ = jax.lax.scan(body, state, (jax.numpy.arange(Xb.shape[0]), Xb, yb))
            return state

        self._full = jax.jit(full)
        self._one = jax.jit(step)

    def run(self, state: Any, X: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[Any, int]:
        n = len(X)
        full = n // batch_size
        if full:
            rows = _bucket(full) * batch_size
            Xp, yp = X[: full * batch_size], y[: full * batch_size]
            if rows > len(Xp):  # padding rows are never read: the loop stops at `full`
                Xp = np.concatenate([Xp, np.zeros((rows - len(Xp),) + X.shape[1:], X.dtype)])
                yp = np.concatenate([yp, np.zeros((rows - len(yp),) + y.shape[1:], y.dtype)])
            Xb = Xp.reshape((-1, batch_size) + X.shape[1:])
            yb = yp.reshape((-1, batch_size) + y.shape[1:])
            state = self._full(state, Xb, yb, full)
        if n > full * batch_size:
            state = self._one(state, X[full * batch_size :], y[full * batch_size :])
        return state, full + (1 if n > full * batch_size else 0)


class JaxBackend(Backend):
    """Keras 3 on JAX: jitted ``fori_loop`` programs over the model's stateless steps."""

    name = "jax"

    # -------------------------------------------------------------- process setup
    def worker_environ(self, threads: int, log_level: int) -> dict[str, str]:
        env = {"KERAS_BACKEND": self.name, "TF_CPP_MIN_LOG_LEVEL": str(log_level)}
        # XLA's CPU client sizes its pool from the cores it sees; one worker thread per
        # core is the cluster's layout, so the worker's share is what XLA should use
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags and threads == 1:
            flags = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
        if flags:
            env["XLA_FLAGS"] = flags
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false"))
        return env

    def configure_threads(
        self, threads: int, *, inter_op: int | None = None, gpu_memory_growth: bool = True
    ) -> dict[str, Any]:
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return {"intra_op": threads, "inter_op": None, "gpus": [str(d) for d in gpus]}

    def versions(self) -> dict[str, str | None]:
        try:
            import jax
            import jaxlib
        except ImportError:  # pragma: no cover - a broken install
            return {"jax": None}
        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}

    # ---------------------------------------------------------------------- state
    def ensure_built(self, model: Any, X: np.ndarray, y: np.ndarray) -> None:
        layout = input_layout_of(model)
        if not model.built and not layout:
            model.build((None,) + tuple(X.shape[1:]))
        if not getattr(model, "_daskml_metrics_built", False):
            # builds the metrics, the loss and the optimizer on symbolic tensors: nothing runs
            model._symbolic_build(data_batch=(split_inputs(layout, X[:1]), y[:1]))
            opt = model.optimizer
            if opt is not None and not opt.built:
                opt.build(model.trainable_variables)
            self.reset_metrics(model)
            model._daskml_metrics_built = True

    # ---------------------------------------------------------------- compiled loops
    def make_train_fn(self, model: Any) -> TrainFn:
        loop: list[_Loop] = []

        def step(state, xb, yb):
            _, state = model.train_step(state, (loop[0].inputs(xb), yb))
            return state

        loop.append(_Loop(model, step))

        def call(X: np.ndarray, y: np.ndarray, batch_size: int) -> int:
            if len(X) == 0:
                return 0
            groups = (model.trainable_variables, model.non_trainable_variables,
                      model.optimizer.variables, model.metrics_variables)
            state, steps = loop[0].run(tuple(_values(g) for g in groups), X, y, batch_size)
            for g, values in zip(groups, state):
                _assign(g, values)
            return steps

        return call

    def make_eval_fn(self, model: Any) -> TrainFn:
        loop: list[_Loop] = []

        def step(state, xb, yb):
            _, state = model.test_step(state, (loop[0].inputs(xb), yb))
            return state

        loop.append(_Loop(model, step))

        def call(X: np.ndarray, y: np.ndarray, batch_size: int) -> int:
            if len(X) == 0:
                return 0
            groups = (model.trainable_variables, model.non_trainable_variables, model.metrics_variables)
            state, steps = loop[0].run(tuple(_values(g) for g in groups), X, y, batch_size)
            _assign(model.metrics_variables, state[2])
            return steps

        return call

    def _grad_of_batch(self, model: Any) -> Callable[..., Any]:
        """``(tv, ntv, opt_vars, mv, xb, yb) -> (grads, mv)``: the gradient of the batch's
        mean loss at ``tv``; the metrics take the batch in (as ``train_step`` does)."""
        import jax

        layout = input_layout_of(model)
        grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)

        def grads(tv, ntv, opt_vars, mv, xb, yb):
            x = split_inputs(layout, xb)
            (_, aux), g = grad_fn(tv, ntv, mv, x, yb, None, training=True, optimizer_variables=opt_vars)
            unscaled, y_pred, _, mv = aux
            _, mv = model._update_metrics_variables(mv, unscaled, x, yb, y_pred, None)
            return g, mv

        return grads

    def _weights_split(self, model: Any) -> Callable[[list[Any]], tuple[list[Any], list[Any]]]:
        """``model.weights``-ordered values -> (trainable, non-trainable) in the model's orders."""
        where = {id(v): i for i, v in enumerate(model.weights)}
        t_idx = [where[id(v)] for v in model.trainable_variables]
        n_idx = [where[id(v)] for v in model.non_trainable_variables]
        return lambda w: ([w[i] for i in t_idx], [w[i] for i in n_idx])

    def _metric_lists(self, model: Any, flat: list[Any]) -> list[list[np.ndarray]]:
        out, at = [], 0
        for m in model.metrics:
            k = len(m.variables)
            out.append([np.asarray(v) for v in flat[at : at + k]])
            at += k
        return out

    def make_gradient_loop_fn(self, model: Any) -> Callable[..., tuple[Any, list[list[np.ndarray]]]]:
        """``fn(X, y, batch_size, weights) -> (gradients, metric_state)``: as the
        TensorFlow backend's (the sample-weighted mean of every batch's gradient at the
        same weights; metrics zeroed first)."""
        import jax.numpy as jnp

        grads = self._grad_of_batch(model)
        split = self._weights_split(model)
        t_shapes = [tuple(v.shape) for v in model.trainable_variables]
        all_shapes = [tuple(v.shape) for v in model.weights]
        flat_ok = all(v.dtype == "float32" for v in model.weights)

        def step(state, xb, yb):
            acc, tv, ntv, ov, mv = state
            g, mv = grads(tv, ntv, ov, mv, xb, yb)
            rows = xb.shape[0]
            acc = [a + rows * gi for a, gi in zip(acc, g)]
            return acc, tv, ntv, ov, mv

        loop = _Loop(model, step)

        def call(X: np.ndarray, y: np.ndarray, batch_size: int, weights: Any) -> tuple[Any, list[list[np.ndarray]]]:
            packed = isinstance(weights, np.ndarray)
            if packed and not flat_ok:
                raise ArgumentError("Packed weights need a model whose weights are all float32")
            w = unpack(weights, all_shapes) if packed else list(weights)
            if len(w) != len(all_shapes):
                raise ArgumentError(f"Expected {len(all_shapes)} weight arrays. Received: {len(w)}")
            tv, ntv = split([jnp.asarray(a) for a in w])
            mv = [jnp.zeros_like(v.value) for v in model.metrics_variables]
            acc = [jnp.zeros(s, jnp.float32) for s in t_shapes]
            state = (acc, tv, ntv, _values(model.optimizer.variables), mv)
            (acc, _, _, _, mv), _ = loop.run(state, X, y, batch_size)
            n = max(1, len(X))
            out = [np.asarray(a) / np.float32(n) for a in acc]
            metrics = self._metric_lists(model, mv)
            if packed:
                return np.concatenate([o.ravel() for o in out]).astype(np.float32), metrics
            return out, metrics

        return call

    def make_apply_fn(self, model: Any) -> Callable[[Any], Any]:
        """One optimizer step with the model's optimizer; returns every model weight."""
        import jax

        opt = model.optimizer
        tvars = list(model.trainable_variables)
        if not opt.built:
            opt.build(tvars)
        g_shapes = [tuple(v.shape) for v in tvars]
        all_float32 = all(v.dtype == "float32" for v in model.weights)
        apply = jax.jit(lambda ov, g, tv: opt.stateless_apply(ov, g, tv))

        def call(gradients: Any) -> Any:
            packed = isinstance(gradients, np.ndarray)
            g = unpack(gradients, g_shapes) if packed else list(gradients)
            if len(g) != len(tvars):
                raise ArgumentError(f"Expected {len(tvars)} gradient arrays. Received: {len(g)}")
            tv, ov = apply(_values(opt.variables), g, _values(tvars))
            _assign(tvars, tv)
            _assign(opt.variables, ov)
            weights = [np.asarray(v.value) for v in model.weights]
            if packed and all_float32:
                return np.concatenate([w.ravel() for w in weights])
            return weights

        return call

    def make_fused_step_fn(self, model: Any) -> Callable[..., np.ndarray]:
        """``fn(X, y, prev) -> grads``: apply ``prev`` (packed mean gradients, or None),
        then the packed gradient of batch ``(X, y)`` at the new weights; ``fn(None, None,
        prev)`` only applies. One XLA call per all-reduce step."""
        import jax
        import jax.numpy as jnp

        opt = model.optimizer
        tvars = list(model.trainable_variables)
        if not opt.built:
            opt.build(tvars)
        if not all(v.dtype == "float32" for v in tvars):
            raise ArgumentError("AllReduce needs a model whose trainable weights are all float32")
        shapes = [tuple(v.shape) for v in tvars]
        sizes = [int(np.prod(s)) for s in shapes]
        grads = self._grad_of_batch(model)

        def unflat(p):
            out, at = [], 0
            for s, k in zip(shapes, sizes):
                out.append(jnp.reshape(p[at : at + k], s))
                at += k
            return out

        def apply(ov, tv, packed):
            tv, ov = opt.stateless_apply(ov, unflat(packed), tv)
            return ov, tv

        def step(ov, tv, ntv, mv, packed, has_prev, xb, yb):
            ov, tv = jax.lax.cond(has_prev, lambda: apply(ov, tv, packed), lambda: (ov, tv))
            g, mv = grads(tv, ntv, ov, mv, xb, yb)
            return ov, tv, mv, jnp.concatenate([jnp.ravel(a) for a in g])

        jit_apply, jit_step = jax.jit(apply), jax.jit(step)

        def call(X: np.ndarray | None, y: np.ndarray | None, prev: np.ndarray | None) -> np.ndarray | None:
            ov, tv = _values(opt.variables), _values(tvars)
            if X is None:
                ov, tv = jit_apply(ov, tv, jnp.asarray(prev))
                _assign(opt.variables, ov)
                _assign(tvars, tv)
                return None
            has_prev = prev is not None
            packed = prev if has_prev else np.zeros(sum(sizes), np.float32)
            ov, tv, mv, g = jit_step(ov, tv, _values(model.non_trainable_variables), _values(model.metrics_variables),
                                     jnp.asarray(packed), has_prev, X, y)
            _assign(opt.variables, ov)
            _assign(tvars, tv)
            _assign(model.metrics_variables, mv)
            return np.asarray(g)

        return call

    def compiled_forward(self, model: Any) -> Callable[[np.ndarray], np.ndarray]:
        """``x -> model(x, training=False)``: one jitted ``stateless_call``; rows are padded
        to a power of two so that batches of every size share a few programs (the model's
        variables are read at every call)."""
        import jax

        layout = input_layout_of(model)
        kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
        fn = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, split_inputs(layout, x), **kwargs)[0])

        def call(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float32)
            n = len(x)
            rows = _bucket(max(1, n))
            if rows > n:
                x = np.concatenate([x, np.zeros((rows - n,) + x.shape[1:], np.float32)])
            out = fn(_values(model.trainable_variables), _values(model.non_trainable_variables), x)
            return np.asarray(out)[:n]

        return call
