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

from typing import Any, Sequence

import numpy as np

__all__ = ["StackedTrainer", "StackedForward"]


def _forward(spec: Any, params: Sequence[Any], x: Any, training: bool) -> Any:
    """``x`` of shape ``(groups, rows, features)`` through the chain with stacked ``params``."""
    import tensorflow as tf

    h = x
    for step in spec.steps:
        if step.kind == "dense":
            h = tf.matmul(h, params[step.kernel])
            if step.bias >= 0:
                h = h + params[step.bias][:, None, :]
            if step.activation is not None:
                h = step.activation(h)
        elif step.kind == "dropout":
            if training and step.rate > 0:
                h = tf.nn.dropout(h, rate=step.rate)
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
