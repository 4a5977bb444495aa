"""The TensorFlow implementation of :class:`~daskml_scale.backend.base.Backend`.

Compiled loops are ``tf.function`` graphs traced once with the batch dimension left
open: one call runs many steps, so the per-step cost is the step itself (~0.2 ms for a
small MLP on one core, against ~1 ms of Python per step inside ``model.fit``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from daskml_scale.backend.base import Backend, TrainFn, assign_values, input_layout_of, split_inputs, unpack
from daskml_scale.exceptions import ArgumentError

__all__ = ["TensorFlowBackend"]

#: the function a TensorFlow retracing warning names: ``<function outer.<locals>.run at 0x...>``
_TRACED = re.compile(r"calls to <(?:function|bound method) ([\w.<>]+)[ >]")
#: modules whose compiled functions are new ``tf.function`` objects for each model
_OWN_MODULES = ("daskml_scale.backend.tensorflow", "daskml_scale.backend.tf_stacked")


class _OwnRetracing(logging.Filter):
    """Drops TensorFlow's "N out of the last M calls to <function ...> triggered
    tf.function retracing" warning when the function is one of ours.

    Each model gets its own compiled loops (their variables are captured), so a process
    that trains or serves several models (a fit after a fit, a search, the many-models
    loop) traces each once by design; TensorFlow counts the traces by the Python
    function's code and then blames the user's code with advice that does not apply. A
    warning about any other function (the user's own ``tf.function``) passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "retracing" not in msg:
            return True
        m = _TRACED.search(msg)
        return m is None or not _is_own(m.group(1))


def _is_own(qualname: str) -> bool:
    root = qualname.split(".", 1)[0]
    for name in _OWN_MODULES:
        obj = getattr(sys.modules.get(name), root, None)
        if obj is not None and getattr(obj, "__module__", None) == name:
            return True
    return False


def _quiet_own_retracing() -> None:
    """Install :class:`_OwnRetracing` on TensorFlow's logger, once per process."""
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _OwnRetracing) for f in logger.filters):
        logger.addFilter(_OwnRetracing())


_quiet_own_retracing()


def _assign_fn(variables: list[Any]) -> Callable[[list[np.ndarray]], None]:
    """One graph call that assigns every variable (one eager op each is ~10x slower)."""
    import tensorflow as tf

    # the variables are captured, one function per set of them: passing them as arguments
    # (one function per process, traced by shape and dtype) gave wrong metric values in a
    # long-lived driver process with many models of the same shapes
    @tf.function
    def assign(values):
        for v, x in zip(variables, values):
            v.assign(x)
        return tf.constant(0)

    def call(values: list[np.ndarray]) -> None:
        assign([
            tf.convert_to_tensor(np.asarray(x, dtype=v.dtype.name if hasattr(v.dtype, "name") else v.dtype))
            for v, x in zip(variables, values)
        ])

    return call


def _cached_assign(model: Any, name: str, variables: list[Any]) -> Callable[[list[np.ndarray]], None]:
    """The model's assignment of ``variables``: eager on the first call (one op a variable,
    ~2 ms for a small model), then one graph call, traced on the second call (~0.05 s).
    A state set once (a worker's first epoch, the driver's model after a fit) is not worth
    the trace; one set every epoch or every sync is."""
    key = f"_daskml_assign_{name}"
    got = getattr(model, key, None)
    if got is None or got[0] != len(variables):
        setattr(model, key, [len(variables), None])
        return lambda values: assign_values(variables, values)
    if got[1] is None:
        got[1] = _assign_fn(variables)
    return got[1]


def _inputs_of(model: Any) -> Callable[[Any], Any]:
    """Rows of ``X`` -> what ``model`` takes: ``X`` itself, or a dict of its named inputs
    cut inside the graph (:func:`~daskml_scale.backend.base.split_inputs`)."""
    layout = input_layout_of(model)
    return lambda x: split_inputs(layout, x)


def _batch_loop(model: Any, step: Callable[[Any], Any]) -> TrainFn:
    """``fn(X, y, batch_size)``: one graph execution that calls ``step((x, y))`` per batch.

    The graph is traced once, on the first call, with the batch dimension left open, so
    arrays of any length reuse it.
    """
    import tensorflow as tf

    compiled: list[Any] = []
    inputs = _inputs_of(model)

    def run(X, y, batch_size):
        return _steps_over(step, inputs, X, y, batch_size)

    def call(X: np.ndarray, y: np.ndarray, batch_size: int) -> int:
        if len(X) == 0:
            return 0
        x_t, y_t = tf.convert_to_tensor(X), tf.convert_to_tensor(y)
        if not compiled:
            compiled.append(tf.function(run, input_signature=_rows_signature(x_t, y_t), autograph=False))
        return int(compiled[0](x_t, y_t, tf.constant(batch_size, tf.int32)))

    return call


def _steps_over(step: Callable[[Any], Any], inputs: Callable[[Any], Any], X: Any, y: Any, batch_size: Any) -> Any:
    """Inside a graph: ``step((x, y))`` per batch of ``batch_size`` rows of ``(X, y)``, in a
    ``tf.while_loop``; the number of steps.

    The loop is written out rather than left to AutoGraph, and the functions around it are
    traced with ``autograph=False``: as in Keras's own ``fit`` (its step is
    ``do_not_convert``), the model's ``train_step`` and layers are traced as written.
    Converting them took ~0.2 s more of a fresh worker's first trace (0.49-0.54 s against
    0.28-0.30 s for the wide flights model)."""
    import tensorflow as tf

    n = tf.shape(X)[0]
    steps = (n + batch_size - 1) // batch_size

    def body(i):
        lo = i * batch_size
        hi = tf.minimum(lo + batch_size, n)
        step((inputs(X[lo:hi]), y[lo:hi]))
        return (i + 1,)

    tf.while_loop(lambda i: i < steps, body, (tf.constant(0, tf.int32),))
    return steps


def _rows_signature(x_t: Any, y_t: Any) -> list[Any]:
    """``(X, y, batch_size)`` with the batch dimension left open."""
    import tensorflow as tf

    return [tf.TensorSpec((None,) + tuple(x_t.shape[1:]), x_t.dtype),
            tf.TensorSpec((None,) + tuple(y_t.shape[1:]), y_t.dtype), tf.TensorSpec((), tf.int32)]


#: rows a model's evaluation runs eagerly (Keras's ``test_step`` on large batches) before it
#: traces its graph loop: tracing costs about 0.6 s in a fresh worker, and eager batches
#: about 10 ms per 8,192 rows more than the graph, so a validation set of tens of thousands
#: of rows is evaluated sooner eagerly for many epochs, and a large one is traced once
EAGER_EVAL_ROWS = 262_144
#: bytes of features in one eager evaluation batch (at most 8,192 rows)
_EAGER_BATCH_BYTES = 32 << 20


def _eager_then_traced_eval(model: Any) -> TrainFn:
    """``fn(X, y, batch_size)`` accumulating the model's metrics over the rows: eager
    until ``EAGER_EVAL_ROWS`` rows were evaluated, then the traced loop of
    :func:`_batch_loop`. The metrics are sums (the loss tracker weighs each batch by its
    rows), so the batch size of the eager path does not change them."""
    import tensorflow as tf

    traced = _batch_loop(model, model.test_step)
    inputs = _inputs_of(model)
    eager_rows = [0]

    def call(X: np.ndarray, y: np.ndarray, batch_size: int) -> int:
        n = len(X)
        if n == 0:
            return 0
        if eager_rows[0] + n > EAGER_EVAL_ROWS:
            return traced(X, y, batch_size)
        eager_rows[0] += n
        row_bytes = max(1, int(X.itemsize * np.prod(X.shape[1:], dtype=np.int64)))
        batch = max(int(batch_size), min(8192, _EAGER_BATCH_BYTES // row_bytes))
        steps = 0
        for lo in range(0, n, batch):
            model.test_step((inputs(tf.convert_to_tensor(X[lo: lo + batch])), tf.convert_to_tensor(y[lo: lo + batch])))
            steps += 1
        return steps

    return call


def _loss_and_metrics(model: Any) -> tuple[Callable[..., Any], Any]:
    """The model's loss as ``train_step`` computes it, and its loss tracker.

    Keras 3 has no public handle on either. ``Trainer._compute_loss`` is the wrapper its
    own ``train_step`` calls (it supports ``compute_loss`` overrides written before
    Keras 3.3 without the ``training`` argument), and ``Trainer._loss_tracker`` is the
    ``Mean`` that ``fit`` reports as ``loss`` (``keras/src/trainers/trainer.py``:
    ``compile`` creates it, the ``metrics`` property lists it first). Both are used here
    only, so that a Keras upgrade that renames them breaks one module.
    """
    return model._compute_loss, model._loss_tracker


class TensorFlowBackend(Backend):
    """Keras 3 on TensorFlow: ``tf.function`` loops, graph-assigned state."""

    name = "tensorflow"

    # -------------------------------------------------------------- process setup
    def worker_environ(self, threads: int, log_level: int) -> dict[str, str]:
        env = {
            "KERAS_BACKEND": self.name,
            "TF_CPP_MIN_LOG_LEVEL": str(log_level),
            "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": str(max(1, min(2, threads))),
        }
        # oneDNN's kernels are ~3x faster for Dense layers on x86 and TensorFlow's default;
        # workers follow the driver's choice (TF_ENABLE_ONEDNN_OPTS=0 gives bit-stable numbers)
        if "TF_ENABLE_ONEDNN_OPTS" in os.environ:
            env["TF_ENABLE_ONEDNN_OPTS"] = os.environ["TF_ENABLE_ONEDNN_OPTS"]
        return env

    def configure_threads(
        self, threads: int, *, inter_op: int | None = None, gpu_memory_growth: bool = True
    ) -> dict[str, Any]:
        import tensorflow as tf

        settings: dict[str, Any] = {"intra_op": threads, "inter_op": inter_op or max(1, min(2, threads))}
        try:
            tf.config.threading.set_intra_op_parallelism_threads(settings["intra_op"])
            tf.config.threading.set_inter_op_parallelism_threads(settings["inter_op"])
        except RuntimeError:
            # TensorFlow was already initialised in this process (e.g. by a task that
            # ran before the plugin): its pools keep the sizes they started with.
            settings["intra_op"] = tf.config.threading.get_intra_op_parallelism_threads()
            settings["inter_op"] = tf.config.threading.get_inter_op_parallelism_threads()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus and gpu_memory_growth:
            for gpu in gpus:
                try:
                    tf.config.experimental.set_memory_growth(gpu, True)
                except RuntimeError:
                    pass
        settings["gpus"] = [g.name for g in gpus]
        return settings

    def effective_threads(self) -> dict[str, int | None]:
        import tensorflow as tf

        return {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        }

    def versions(self) -> dict[str, str | None]:
        try:
            import tensorflow as tf
        except ImportError:  # pragma: no cover - a broken install
            return {"tensorflow": None}
        return {"tensorflow": tf.__version__}

    # ---------------------------------------------------------------------- state
    def set_weights(self, model: Any, weights: list[np.ndarray]) -> None:
        variables = list(model.weights)
        if len(variables) != len(weights):
            raise ArgumentError(f"Expected {len(variables)} weight arrays. Received: {len(weights)}")
        _cached_assign(model, "weights", variables)(weights)

    def set_optimizer_state(self, model: Any, state: list[np.ndarray]) -> None:
        variables = self.optimizer_variables(model)
        self._check_optimizer_state(variables, state)
        _cached_assign(model, "optimizer", variables)(state)

    # ---------------------------------------------------------------- compiled loops
    def make_train_fn(self, model: Any) -> TrainFn:
        return _batch_loop(model, model.train_step)

    def make_eval_fn(self, model: Any) -> TrainFn:
        return _eager_then_traced_eval(model)

    def make_packed_train_fn(self, model: Any, variables: Any) -> Callable[..., np.ndarray]:
        """One graph call per round: assign the state, the train loop, read the state
        (a round of a small model's local SGD spent ~6 ms of its ~25 ms in the eager
        reads and assignments around the loop). Variables that are not all float32
        take the generic path."""
        import tensorflow as tf

        variables = list(variables)
        if not all(v.dtype == "float32" for v in variables):
            return super().make_packed_train_fn(model, variables)
        shapes = [tuple(v.shape) for v in variables]
        sizes = [int(np.prod(sh)) for sh in shapes]
        inputs = _inputs_of(model)
        compiled: list[Any] = []

        def assign(state):
            for v, part, shape in zip(variables, tf.split(state, sizes), shapes):
                v.assign(tf.reshape(part, shape))
            return tf.constant(0)

        def run(X, y, batch_size, state, has_state):
            tf.cond(has_state, lambda: assign(state), lambda: tf.constant(0))
            _steps_over(model.train_step, inputs, X, y, batch_size)
            return tf.concat([tf.reshape(v.value, [-1]) for v in variables], 0)

        def call(X: np.ndarray, y: np.ndarray, batch_size: int, state: np.ndarray | None) -> np.ndarray:
            x_t, y_t = tf.convert_to_tensor(X), tf.convert_to_tensor(y)
            if not compiled:
                compiled.append(tf.function(run, autograph=False, input_signature=[
                    *_rows_signature(x_t, y_t), tf.TensorSpec((None,), tf.float32), tf.TensorSpec((), tf.bool)]))
            given = np.zeros(0, np.float32) if state is None else np.asarray(state, np.float32)
            return compiled[0](x_t, y_t, tf.constant(batch_size, tf.int32), tf.convert_to_tensor(given),
                               tf.constant(state is not None)).numpy()

        return call

    def make_gradient_loop_fn(self, model: Any) -> Callable[..., tuple[Any, list[list[np.ndarray]]]]:
        """``fn(X, y, batch_size, weights) -> (gradients, metric_state)`` in one graph call.

        ``weights`` as a list gives a list of gradients; packed (:func:`pack`), packed
        gradients. ``weights`` (every model weight) are assigned first, in the same
        graph call. The rows are cut into batches of ``batch_size``; every batch's
        gradient of its mean loss is taken at the *same* weights (nothing is applied) and
        the result is their sample-weighted mean, i.e. the gradient of the mean loss
        over all rows. The model's metrics are zeroed first and their state (sums) over
        these rows is returned with the gradients.
        """
        import tensorflow as tf

        compute_loss, loss_tracker = _loss_and_metrics(model)
        inputs = _inputs_of(model)
        metric_vars = [list(m.variables) for m in model.metrics]
        all_vars = list(model.weights)

        def start(weights):
            for v, w in zip(all_vars, weights):
                v.assign(w)
            for vs in metric_vars:
                for v in vs:
                    v.assign(tf.zeros_like(v))

        def batch_grads(xb, yb):
            """Gradients of the batch's mean loss; the metrics take the batch in."""
            n_rows = tf.shape(xb)[0]
            xb = inputs(xb)
            with tf.GradientTape() as tape:
                y_pred = model(xb, training=True)
                loss = compute_loss(x=xb, y=yb, y_pred=y_pred, sample_weight=None, training=True)
            grads = tape.gradient(loss, model.trainable_variables)
            loss_tracker.update_state(loss, sample_weight=n_rows)
            model.compute_metrics(xb, yb, y_pred, sample_weight=None)
            return grads

        def metric_values():
            return [[tf.identity(v) for v in vs] for vs in metric_vars]

        @tf.function(reduce_retracing=True)
        def run(X, y, batch_size, weights):
            start(weights)
            n = tf.shape(X)[0]
            steps = (n + batch_size - 1) // batch_size
            acc = [tf.zeros_like(v) for v in model.trainable_variables]
            for i in tf.range(steps):
                lo = i * batch_size
                hi = tf.minimum(lo + batch_size, n)
                grads = batch_grads(X[lo:hi], y[lo:hi])
                acc = [a + tf.cast(hi - lo, a.dtype) * g for a, g in zip(acc, grads)]
            out = [a / tf.cast(n, a.dtype) for a in acc]
            return out, metric_values()

        shapes = [tuple(v.shape) for v in all_vars]
        sizes = [int(np.prod(s)) for s in shapes]
        flat_ok = all(v.dtype == "float32" for v in all_vars)

        def unpacked(packed):
            return [tf.reshape(p, s) for p, s in zip(tf.split(packed, sizes), shapes)]

        def packed_out(grads):
            return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

        @tf.function(reduce_retracing=True)
        def run_packed(X, y, batch_size, packed):
            # one tensor in and one out: a call with lists of tensors pays per element
            grads, metrics = run(X, y, batch_size, unpacked(packed))
            return packed_out(grads), metrics

        @tf.function(reduce_retracing=True)
        def run_one_packed(X, y, packed):
            # rows that fit in one batch (push_every=1): no loop in the graph, ~0.1 ms less a call
            start(unpacked(packed))
            return packed_out(batch_grads(X, y)), metric_values()

        def call(X: np.ndarray, y: np.ndarray, batch_size: int, weights: Any) -> tuple[Any, list[list[np.ndarray]]]:
            if isinstance(weights, np.ndarray):
                if not flat_ok:
                    raise ArgumentError("Packed weights need a model whose weights are all float32")
                if len(X) <= batch_size:
                    g, m = run_one_packed(tf.convert_to_tensor(X), tf.convert_to_tensor(y), tf.convert_to_tensor(weights))
                else:
                    g, m = run_packed(tf.convert_to_tensor(X), tf.convert_to_tensor(y),
                                      tf.constant(batch_size, tf.int32), tf.convert_to_tensor(weights))
                return g.numpy(), [[v.numpy() for v in vs] for vs in m]
            if len(weights) != len(all_vars):
                raise ArgumentError(f"Expected {len(all_vars)} weight arrays. Received: {len(weights)}")
            g, m = run(tf.convert_to_tensor(X), tf.convert_to_tensor(y), tf.constant(batch_size, tf.int32),
                       [tf.convert_to_tensor(w) for w in weights])
            return [a.numpy() for a in g], [[v.numpy() for v in vs] for vs in m]

        return call

    def make_apply_fn(self, model: Any) -> Callable[[Any], Any]:
        """A compiled ``apply_gradients`` with the model's own optimizer (server side):
        one call is one optimizer step and returns every model weight after it."""
        import tensorflow as tf

        opt = model.optimizer
        tvars = list(model.trainable_variables)
        if not opt.built:
            opt.build(tvars)
        all_vars = list(model.weights)

        @tf.function(reduce_retracing=True)
        def run(grads):
            opt.apply_gradients(zip(grads, tvars))
            return [tf.identity(v) for v in all_vars]

        g_shapes = [tuple(v.shape) for v in tvars]
        g_sizes = [int(np.prod(s)) for s in g_shapes]
        all_float32 = all(v.dtype == "float32" for v in all_vars)

        @tf.function(reduce_retracing=True)
        def run_packed(packed):
            parts = tf.split(packed, g_sizes)
            out = run([tf.reshape(p, s) for p, s in zip(parts, g_shapes)])
            return tf.concat([tf.reshape(w, [-1]) for w in out], 0)

        def call(gradients: Any) -> Any:
            """Packed gradients give packed weights back (one tensor each way); a list, a list."""
            if isinstance(gradients, np.ndarray):
                if all_float32:
                    return run_packed(tf.convert_to_tensor(gradients)).numpy()
                gradients = unpack(gradients, g_shapes)  # e.g. an int64 count among the weights
            if len(gradients) != len(tvars):
                raise ArgumentError(f"Expected {len(tvars)} gradient arrays. Received: {len(gradients)}")
            return [w.numpy() for w in run([tf.convert_to_tensor(g) for g in gradients])]

        return call

    def make_fused_step_fn(self, model: Any) -> Callable[..., np.ndarray]:
        """``fn(X, y, prev) -> grads``: apply ``prev`` (packed mean gradients of the last
        step, or None) with the model's optimizer, then the packed gradient of the mean
        loss of batch ``(X, y)`` at the new weights; the model's metrics take the batch
        in. ``fn(None, None, prev)`` only applies. One graph call per all-reduce step."""
        import tensorflow as tf

        compute_loss, loss_tracker = _loss_and_metrics(model)
        inputs = _inputs_of(model)
        opt = model.optimizer
        tvars = list(model.trainable_variables)
        if not opt.built:
            opt.build(tvars)
        shapes = [tuple(v.shape) for v in tvars]
        sizes = [int(np.prod(sh)) for sh in shapes]
        if not all(v.dtype == "float32" for v in tvars):
            raise ArgumentError("AllReduce needs a model whose trainable weights are all float32")

        def apply(packed):
            opt.apply_gradients(zip([tf.reshape(p, sh) for p, sh in zip(tf.split(packed, sizes), shapes)], tvars))
            return tf.constant(0)

        def grads_of(xb, yb):
            n_rows = tf.shape(xb)[0]
            xb = inputs(xb)
            with tf.GradientTape() as tape:
                y_pred = model(xb, training=True)
                loss = compute_loss(x=xb, y=yb, y_pred=y_pred, sample_weight=None, training=True)
            grads = tape.gradient(loss, tvars)
            loss_tracker.update_state(loss, sample_weight=n_rows)
            model.compute_metrics(xb, yb, y_pred, sample_weight=None)
            return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

        p_spec = tf.TensorSpec((sum(sizes),), tf.float32)
        compiled: dict[str, Any] = {"apply": tf.function(apply, input_signature=[p_spec])}

        def call(X: np.ndarray | None, y: np.ndarray | None, prev: np.ndarray | None) -> np.ndarray | None:
            if X is not None and "step" not in compiled:
                x_spec = tf.TensorSpec((None,) + tuple(np.shape(X)[1:]), tf.as_dtype(np.asarray(X).dtype))
                y_spec = tf.TensorSpec((None,) + tuple(np.shape(y)[1:]), tf.as_dtype(np.asarray(y).dtype))
                def step(xb, yb, packed, has_prev):
                    tf.cond(has_prev, lambda: apply(packed), lambda: tf.constant(0))
                    return grads_of(xb, yb)

                compiled["step"] = tf.function(step, input_signature=[x_spec, y_spec, p_spec,
                                                                      tf.TensorSpec((), tf.bool)])
            if X is None:
                compiled["apply"](tf.convert_to_tensor(prev))
                return None
            has_prev = prev is not None
            packed = prev if has_prev else np.zeros(sum(sizes), np.float32)
            return compiled["step"](tf.convert_to_tensor(X), tf.convert_to_tensor(y), tf.convert_to_tensor(packed),
                                    tf.constant(has_prev)).numpy()

        return call

    def make_stacked_trainer(self, spec: Any) -> Any:
        from daskml_scale.backend.tf_stacked import StackedTrainer

        return StackedTrainer(spec)

    def make_stacked_forward(self, spec: Any, weights: Any) -> Callable[..., np.ndarray]:
        from daskml_scale.backend.tf_stacked import StackedForward

        return StackedForward(spec, weights)

    def compiled_forward(self, model: Any) -> Callable[[np.ndarray], np.ndarray]:
        """A ``tf.function`` with a ``(None, n_features)`` signature: one trace for every
        batch size (a model with named inputs gets ``X`` cut inside the graph)."""
        import tensorflow as tf

        layout = input_layout_of(model)
        inputs = _inputs_of(model)
        if layout:
            width = max(s.stop for s in layout)
        else:
            width = model.inputs[0].shape[-1] if getattr(model, "inputs", None) else None
        fn = tf.function(
            lambda x: model(inputs(x), training=False),
            input_signature=[tf.TensorSpec([None, width], tf.float32)],
        )
        # the one trace, called directly: a tf.function call first binds its arguments and
        # looks its trace up (~0.2 ms), a large part of a one-row request
        concrete = fn.get_concrete_function()
        return lambda x: concrete(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()
