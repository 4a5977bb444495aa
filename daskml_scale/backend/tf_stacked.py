"""Many models of one architecture as ONE TensorFlow program (TensorFlow backend).

Every weight of the architecture is held once, stacked: a variable of shape
``(groups, *shape)`` whose leading dimension is left open, so one trace serves any
number of groups. A training step is a batched matrix product per Dense layer
(``(groups, batch, in) @ (groups, in, out)``), the per-group mean loss, one gradient
of their sum (the groups' weights are disjoint, so each group gets its own gradient)
and one optimizer update per group, with its own step count (Adam's bias
correction), written into the active groups' slice of the variables.

The groups of a plan are ordered by their number of steps per epoch, largest first,
so the groups that still have a batch at step ``s`` are a prefix: a step computes
and updates only them. The plan (which rows make which group's batch) is made by the
caller (:mod:`daskml_scale.groups.plan`); this module sees NumPy arrays only.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["StackedTrainer", "StackedForward", "TrialStackTrainer"]


def _forward(spec: Any, params: Sequence[Any], x: Any, training: bool,
             dropout: Callable[[Any, int, Any], Any] | None = None) -> Any:
    """``x`` of shape ``(groups, rows, features)`` through the chain with stacked ``params``;
    ``dropout(h, i, step)`` replaces the ``i``-th dropout step's own rate in training."""
    import tensorflow as tf

    h = x
    d = 0
    for step in spec.steps:
        if step.kind == "dense":
            h = tf.matmul(h, params[step.kernel])
            if step.bias >= 0:
                h = h + params[step.bias][:, None, :]
            if step.activation is not None:
                h = step.activation(h)
        elif step.kind == "dropout":
            if training and dropout is not None:
                h = dropout(h, d, step)
            elif training and step.rate > 0:
                h = tf.nn.dropout(h, rate=step.rate)
            d += 1
        else:
            h = step.layer(h)
    return h


def _group_losses(spec: Any, params: Sequence[Any], xb: Any, yb: Any, mask: Any, training: bool) -> tuple[Any, Any]:
    """Per group: the mean loss over its valid rows of the batch, and the row count."""
    import tensorflow as tf

    pred = _forward(spec, params, xb, training)
    # y as (groups, rows, 1), as Keras sees a (rows,) target next to (rows, outputs): one loss per row
    per_row = tf.cast(spec.loss(tf.cast(yb, pred.dtype)[..., None], pred), tf.float32)  # (groups, rows)
    count = tf.reduce_sum(mask, axis=1)
    mean = tf.reduce_sum(per_row * mask, axis=1) / tf.maximum(count, 1.0)
    return mean, count


class StackedTrainer:
    """Stacked weights and optimizer state of many groups, and the compiled epoch.

    ``load(weights)`` sets the groups' starting weights (a list like ``model.weights``,
    each ``(groups, *shape)``) and zeroes the optimizer state; ``train_epoch`` runs one
    epoch of a plan; ``evaluate`` sums losses at the current weights; ``weights()``
    reads the result.
    """

    def __init__(self, spec: Any) -> None:
        import tensorflow as tf

        self.spec = spec
        self.params = [
            tf.Variable(tf.zeros((0, *s), tf.float32), shape=tf.TensorShape([None, *s]), trainable=False)
            for s in spec.weight_shapes
        ]
        opt = spec.optimizer
        n_slots = 2 if opt["name"] == "adam" else (1 if opt.get("momentum", 0.0) else 0)
        self.slots = [
            [tf.Variable(tf.zeros((0, *s), tf.float32), shape=tf.TensorShape([None, *s]), trainable=False)
             for s in spec.weight_shapes]
            for _ in range(n_slots)
        ]
        i32, f32 = tf.int32, tf.float32
        f = spec.n_features
        plan_sig = [
            tf.TensorSpec((None, f), f32), tf.TensorSpec((None,), f32),
            tf.TensorSpec((None, None, None), i32), tf.TensorSpec((None,), i32),
        ]
        self._train = tf.function(self._epoch, input_signature=[*plan_sig, tf.TensorSpec((None,), i32),
                                                                tf.TensorSpec((), i32)])
        self._eval = tf.function(self._evaluate, input_signature=plan_sig)

    # ------------------------------------------------------------------ state
    def load(self, weights: Sequence[np.ndarray]) -> None:
        if len(weights) != len(self.params):
            raise ValueError(f"Expected {len(self.params)} stacked weight arrays. Received: {len(weights)}")
        for v, w in zip(self.params, weights):
            v.assign(np.ascontiguousarray(w, dtype=np.float32))
        for slots in self.slots:
            for v, w in zip(slots, weights):
                v.assign(np.zeros(np.shape(w), np.float32))

    def weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.params]

    # ------------------------------------------------------------------ the programs
    def _update(self, k: Any, grads: list[Any], local_step: Any) -> None:
        """One optimizer step for the first ``k`` groups (Keras's update rules)."""
        import tensorflow as tf

        opt = self.spec.optimizer
        lr = tf.constant(opt["learning_rate"], tf.float32)
        for i, (v, g) in enumerate(zip(self.params, grads)):
            w = v[:k]
            if opt["name"] == "adam":
                b1, b2, eps = opt["beta_1"], opt["beta_2"], opt["epsilon"]
                m_var, v_var = self.slots[0][i], self.slots[1][i]
                t = tf.reshape(local_step, [-1] + [1] * (len(g.shape) - 1))
                alpha = lr * tf.sqrt(1.0 - tf.pow(tf.constant(b2, tf.float32), t)) / (
                    1.0 - tf.pow(tf.constant(b1, tf.float32), t))
                m = m_var[:k]
                s = v_var[:k]
                m = m + (g - m) * (1.0 - b1)
                s = s + (tf.square(g) - s) * (1.0 - b2)
                m_var[:k].assign(m)
                v_var[:k].assign(s)
                v[:k].assign(w - (m * alpha) / (tf.sqrt(s) + eps))
            elif self.slots:
                mom = opt["momentum"]
                m_var = self.slots[0][i]
                m = m_var[:k] * mom - g * lr
                m_var[:k].assign(m)
                v[:k].assign(w + (m * mom - g * lr if opt["nesterov"] else m))
            else:
                v[:k].assign(w - g * lr)

    def _epoch(self, X: Any, y: Any, idx: Any, active: Any, steps: Any, epoch: Any) -> Any:
        """Steps ``s`` of the epoch: groups ``[:active[s]]`` train on rows ``idx[s]``.

        Returns per group the sum over its steps of (batch mean loss x batch rows), as
        Keras's loss tracker weighs them."""
        import tensorflow as tf

        n_groups = tf.shape(idx)[1]
        acc = tf.zeros([n_groups], tf.float32)
        for s in tf.range(tf.shape(idx)[0]):
            k = active[s]
            rows = idx[s, :k]
            mask = tf.cast(rows >= 0, tf.float32)
            safe = tf.maximum(rows, 0)
            # wait-bounded: tf.gather is a TensorFlow op, not a wait on the cluster
            xb, yb = tf.gather(X, safe), tf.gather(y, safe)
            params = [v[:k] for v in self.params]
            with tf.GradientTape() as tape:
                tape.watch(params)
                mean, count = _group_losses(self.spec, params, xb, yb, mask, True)
                total = tf.reduce_sum(mean)
            grads = tape.gradient(total, params)
            local_step = tf.cast(epoch * steps[:k] + s + 1, tf.float32)
            self._update(k, grads, local_step)
            acc = acc + tf.pad(mean * count, [[0, n_groups - k]])
        return acc

    def _evaluate(self, X: Any, y: Any, idx: Any, active: Any) -> Any:
        import tensorflow as tf

        n_groups = tf.shape(idx)[1]
        acc = tf.zeros([n_groups], tf.float32)
        for s in tf.range(tf.shape(idx)[0]):
            k = active[s]
            rows = idx[s, :k]
            mask = tf.cast(rows >= 0, tf.float32)
            safe = tf.maximum(rows, 0)
            params = [v[:k] for v in self.params]
            # wait-bounded: tf.gather is a TensorFlow op, not a wait on the cluster
            mean, count = _group_losses(self.spec, params, tf.gather(X, safe), tf.gather(y, safe), mask, False)
            acc = acc + tf.pad(mean * count, [[0, n_groups - k]])
        return acc

    def train_epoch(self, X: np.ndarray, y: np.ndarray, idx: np.ndarray, active: np.ndarray, steps: np.ndarray,
                    epoch: int) -> np.ndarray:
        """One epoch; per group, the sum of batch-mean losses weighted by batch rows."""
        if idx.shape[0] == 0:
            return np.zeros(idx.shape[1], np.float32)
        out = self._train(np.asarray(X, np.float32), np.asarray(y, np.float32), idx.astype(np.int32),
                          active.astype(np.int32), steps.astype(np.int32), np.int32(epoch))
        return out.numpy()

    def evaluate(self, X: np.ndarray, y: np.ndarray, idx: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Per group, the sum of per-row losses at the current weights (rows ``idx``)."""
        if idx.shape[0] == 0 or len(X) == 0:
            return np.zeros(idx.shape[1], np.float32)
        out = self._eval(np.asarray(X, np.float32), np.asarray(y, np.float32), idx.astype(np.int32),
                         active.astype(np.int32))
        return out.numpy()


class StackedForward:
    """Prediction with stacked weights: each row through its own group's weights.

    The weights become constants once; a call gathers each row's weights (rows in
    chunks, so memory stays bounded) and runs the chain as ``groups = rows, batch = 1``.
    """

    def __init__(self, spec: Any, weights: Sequence[np.ndarray], chunk_rows: int = 2048) -> None:
        import tensorflow as tf

        self.spec = spec
        self.chunk = int(chunk_rows)
        self.params = [tf.constant(np.asarray(w, np.float32)) for w in weights]
        f = spec.n_features

        def run(x: Any, codes: Any) -> Any:
            # wait-bounded: tf.gather is a TensorFlow op, not a wait on the cluster
            gathered = [tf.gather(p, codes) for p in self.params]
            return _forward(spec, gathered, x[:, None, :], False)[:, 0, :]

        self._run = tf.function(run, input_signature=[tf.TensorSpec((None, f), tf.float32),
                                                      tf.TensorSpec((None,), tf.int32)])

    def __call__(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        n = len(X)
        if n == 0:
            return np.zeros((0, self.spec.n_outputs), np.float32)
        X = np.asarray(X, np.float32)
        codes = np.asarray(codes, np.int32)
        parts = [self._run(X[i:i + self.chunk], codes[i:i + self.chunk]).numpy() for i in range(0, n, self.chunk)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------------- search trials
def _per(vec: Any, rank: int) -> Any:
    """A per-trial vector ``(trials,)`` shaped to broadcast over ``(trials, *shape)``."""
    import tensorflow as tf

    return tf.reshape(vec, [-1] + [1] * (rank - 1))


class TrialStackTrainer(StackedTrainer):
    """Many search trials of one architecture as ONE program, each with its own settings.

    As :class:`StackedTrainer` (a leading trial axis on every weight, one optimizer state
    per trial), and per trial: the learning rate and the other optimizer constants
    (Adam's ``beta_1``/``beta_2``/``epsilon``, SGD's ``momentum``), the rate of every
    ``Dropout`` step and the L1/L2 penalty of every weight (Keras's regularizers: added to
    the trial's loss, so its reported loss includes them as Keras's does). The spec's
    optimizer is ``{"name": "adam"}`` or ``{"name": "sgd", "nesterov": bool}``; every
    trial has the momentum slot under SGD (a momentum of 0 is plain SGD).

    ``set_state(weights, slots, settings)`` loads a pack (any number of trials: one trace
    serves them all); ``state()`` reads weights and slots back.
    """

    _VECTORS = {"adam": ("learning_rate", "beta_1", "beta_2", "epsilon"), "sgd": ("learning_rate", "momentum")}

    def __init__(self, spec: Any, penalized: Sequence[int] = (), jit_compile: bool = False) -> None:
        import tensorflow as tf

        self.penalized = [int(i) for i in penalized]  # the weights with a regularizer (the others cost nothing)
        self.jit_compile = bool(jit_compile)
        if spec.optimizer["name"] == "sgd":
            spec.optimizer = {**spec.optimizer, "momentum": 1.0}  # the slot exists for every trial
        super().__init__(spec)
        self.n_dropout = sum(1 for s in spec.steps if s.kind == "dropout")
        open_vec = tf.TensorShape([None])
        self.hyper = {name: tf.Variable(tf.zeros((0,), tf.float32), shape=open_vec, trainable=False)
                      for name in self._VECTORS[spec.optimizer["name"]]}
        self.rates = tf.Variable(tf.zeros((self.n_dropout, 0), tf.float32), shape=tf.TensorShape([self.n_dropout, None]),
                                 trainable=False)
        n_w = len(spec.weight_shapes)
        self.l1 = tf.Variable(tf.zeros((n_w, 0), tf.float32), shape=tf.TensorShape([n_w, None]), trainable=False)
        self.l2 = tf.Variable(tf.zeros((n_w, 0), tf.float32), shape=tf.TensorShape([n_w, None]), trainable=False)
        if self.jit_compile:  # XLA fuses a step's many small ops (compiled once per pack size)
            i32, f32 = tf.int32, tf.float32
            sig = [tf.TensorSpec((None, spec.n_features), f32), tf.TensorSpec((None,), f32),
                   tf.TensorSpec((None, None, None), i32), tf.TensorSpec((None,), i32)]
            self._train = tf.function(self._epoch, input_signature=[*sig, tf.TensorSpec((None,), i32),
                                                                    tf.TensorSpec((), i32)], jit_compile=True)
            self._eval = tf.function(self._evaluate, input_signature=sig, jit_compile=True)

    def set_state(self, weights: Sequence[np.ndarray], slots: Sequence[Sequence[np.ndarray]] | None,
                  settings: dict[str, np.ndarray]) -> None:
        """Weights ``(trials, *shape)``, the optimizer slots (``None``: zeros, a fresh optimizer)
        and the per-trial settings: a vector per optimizer constant, ``dropout``
        ``(n_dropout, trials)``, ``l1``/``l2`` ``(n_weights, trials)``."""
        if len(weights) != len(self.params):
            raise ValueError(f"Expected {len(self.params)} stacked weight arrays. Received: {len(weights)}")
        for v, w in zip(self.params, weights):
            v.assign(np.ascontiguousarray(w, dtype=np.float32))
        for i, slot_vars in enumerate(self.slots):
            for j, v in enumerate(slot_vars):
                v.assign(np.zeros(np.shape(weights[j]), np.float32) if slots is None
                         else np.ascontiguousarray(slots[i][j], np.float32))
        for name, v in self.hyper.items():
            v.assign(np.asarray(settings[name], np.float32))
        n = int(np.shape(weights[0])[0])
        self.rates.assign(np.asarray(settings.get("dropout", np.zeros((self.n_dropout, n))), np.float32)
                          .reshape(self.n_dropout, n))
        for name in ("l1", "l2"):
            getattr(self, name).assign(np.asarray(settings.get(name, np.zeros((len(self.params), n))), np.float32)
                                       .reshape(len(self.params), n))

    def state(self) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
        return [v.numpy() for v in self.params], [[v.numpy() for v in slot_vars] for slot_vars in self.slots]

    # ------------------------------------------------------------------ the programs
    def _forward_trials(self, params: Sequence[Any], x: Any, training: bool) -> Any:
        """:func:`_forward` with every trial's own dropout rates (a leading trial axis)."""
        import tensorflow as tf

        def dropout(h: Any, d: int, step: Any) -> Any:
            rate = self.rates[d][:, None, None]
            keep = tf.cast(tf.random.uniform(tf.shape(h)) >= rate, h.dtype)
            return h * keep / tf.maximum(1.0 - rate, 1e-12)

        return _forward(self.spec, params, x, training, dropout)

    def _trial_losses(self, params: Sequence[Any], xb: Any, yb: Any, mask: Any, training: bool) -> tuple[Any, Any]:
        """Per trial: its mean loss over the batch's valid rows plus its weights' penalties."""
        import tensorflow as tf

        pred = self._forward_trials(params, xb, training)
        per_row = tf.cast(self.spec.loss(tf.cast(yb, pred.dtype)[..., None], pred), tf.float32)
        count = tf.reduce_sum(mask, axis=1)
        mean = tf.reduce_sum(per_row * mask, axis=1) / tf.maximum(count, 1.0)
        for i in self.penalized:
            p = params[i]
            axes = list(range(1, len(p.shape)))
            mean = mean + self.l1[i] * tf.reduce_sum(tf.abs(p), axis=axes) + self.l2[i] * tf.reduce_sum(
                tf.square(p), axis=axes)
        return mean, count

    def _apply(self, grads: list[Any], step: Any) -> None:
        """One optimizer step for every trial (Keras's update rules, each trial's constants)."""
        import tensorflow as tf

        opt = self.spec.optimizer
        lr = self.hyper["learning_rate"]
        if opt["name"] == "adam":
            b1, b2, eps = self.hyper["beta_1"], self.hyper["beta_2"], self.hyper["epsilon"]
            alpha = lr * tf.sqrt(1.0 - tf.pow(b2, step)) / (1.0 - tf.pow(b1, step))
            for i, (v, g) in enumerate(zip(self.params, grads)):
                rank = len(g.shape)
                m_var, s_var = self.slots[0][i], self.slots[1][i]
                m = m_var + (g - m_var) * (1.0 - _per(b1, rank))
                s = s_var + (tf.square(g) - s_var) * (1.0 - _per(b2, rank))
                m_var.assign(m)
                s_var.assign(s)
                v.assign_sub((m * _per(alpha, rank)) / (tf.sqrt(s) + _per(eps, rank)))
        else:
            for i, (v, g) in enumerate(zip(self.params, grads)):
                rank = len(g.shape)
                mom, rate = _per(self.hyper["momentum"], rank), _per(lr, rank)
                m_var = self.slots[0][i]
                m = m_var * mom - g * rate
                m_var.assign(m)
                v.assign_add(m * mom - g * rate if opt.get("nesterov") else m)

    def _epoch(self, X: Any, y: Any, idx: Any, active: Any, steps: Any, epoch: Any) -> Any:
        """Every trial of the pack trains at every step (``active`` and ``steps`` are those of
        a full pack: ``idx.shape[1]`` and ``idx.shape[0]``)."""
        import tensorflow as tf

        n_steps = tf.shape(idx)[0]
        acc = tf.zeros([tf.shape(idx)[1]], tf.float32)
        for s in tf.range(n_steps):
            rows = idx[s]
            mask = tf.cast(rows >= 0, tf.float32)
            safe = tf.maximum(rows, 0)
            # wait-bounded: tf.gather is a TensorFlow op, not a wait on the cluster
            xb, yb = tf.gather(X, safe), tf.gather(y, safe)
            with tf.GradientTape() as tape:
                tape.watch(self.params)
                mean, count = self._trial_losses(self.params, xb, yb, mask, True)
                total = tf.reduce_sum(mean)
            grads = tape.gradient(total, self.params)
            self._apply(grads, tf.cast(epoch * n_steps + s + 1, tf.float32))
            acc = acc + mean * count
        return acc

    def _evaluate(self, X: Any, y: Any, idx: Any, active: Any) -> Any:
        import tensorflow as tf

        acc = tf.zeros([tf.shape(idx)[1]], tf.float32)
        params = [tf.convert_to_tensor(v) for v in self.params]
        for s in tf.range(tf.shape(idx)[0]):
            rows = idx[s]
            mask = tf.cast(rows >= 0, tf.float32)
            safe = tf.maximum(rows, 0)
            # wait-bounded: tf.gather is a TensorFlow op, not a wait on the cluster
            mean, count = self._trial_losses(params, tf.gather(X, safe), tf.gather(y, safe), mask, False)
            acc = acc + mean * count
        return acc
