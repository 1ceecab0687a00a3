"""Reference simulations of the asynchronous schedules' update rules (docs/async.md): plain
single-device TensorFlow, independent of the rewriter.

PipeDream-2BW: with W(t) the weights before step t and W(-1) = W(0),
    W(t+1) = W(t) - opt(grad f(W(t-1); batch t)),   train_step(batch t) returns f(W(t-1); batch t).
`TwoBWReference` builds the plain model graph (the same initial values as SingleDeviceTrainer)
and per step: reads W(t), loads W(t-1) into the variables, evaluates the loss and gradients,
loads W(t) back, applies the gradients (fed) with the optimizer, and keeps W(t) as the next
step's previous weights.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graph_rewrite.template import WeightedLoss, build_model_graph
from graph_rewrite.weight_versions import previous_weights_name

v1 = tf.compat.v1


class TwoBWReference:
    def __init__(self, model_fn, feature_spec, optimizer_fn, seed, clip_norm=None):
        self.graph, self.features, loss = build_model_graph(model_fn, feature_spec, seed)
        with self.graph.as_default():
            if isinstance(loss, WeightedLoss):
                loss = tf.math.divide(loss.numerator, loss.denominator)
            self.loss = loss
            trainable = v1.trainable_variables()
            pairs = [
                (g, v) for g, v in zip(tf.gradients(loss, trainable), trainable) if g is not None
            ]
            self.gradients = [g for g, _ in pairs]
            if clip_norm is not None:  # the stale gradient, clipped by its global norm
                self.gradients, _ = tf.clip_by_global_norm(self.gradients, clip_norm)
            self.trainable = {v.op.name: v for _, v in pairs}
            self.fed_gradients = [_placeholder_like(g, v) for g, v in pairs]
            global_step = v1.train.get_or_create_global_step()
            self.apply = optimizer_fn().apply_gradients(
                [(g, v) for g, (_, v) in zip(self.fed_gradients, pairs)], global_step=global_step
            )
            self.all_variables = {v.op.name: v for v in v1.global_variables()}
            self.values = self._placeholders(self.trainable)
            self.assign = tf.group(*[v.assign(self.values[n]) for n, v in self.trainable.items()])
            self.reads = {n: v.read_value() for n, v in self.all_variables.items()}
            init = v1.global_variables_initializer()
        self.graph.finalize()
        self.session = v1.Session(graph=self.graph)
        self.session.run(init)
        self.previous = self._trainable_values()  # W(-1) = W(0)

    @staticmethod
    def _placeholders(variables):
        return {
            n: v1.placeholder(v.dtype.base_dtype, v.shape, name=f"value/{n}")
            for n, v in variables.items()
        }

    def _trainable_values(self) -> dict[str, np.ndarray]:
        return self.session.run({n: self.reads[n] for n in self.trainable})

    def _load(self, values):
        self.session.run(self.assign, {self.values[n]: values[n] for n in self.trainable})

    def train_step(self, batch) -> float:
        feed = {ph: batch[name] for name, ph in self.features.items()}
        current = self._trainable_values()  # W(t)
        self._load(self.previous)  # W(t-1)
        loss, gradients = self.session.run([self.loss, self.gradients], feed)
        self._load(current)
        fed = {}
        for placeholder, value in zip(self.fed_gradients, gradients):
            if isinstance(placeholder, tf.IndexedSlices):
                fed[placeholder.values] = value.values
                fed[placeholder.indices] = value.indices
            else:
                fed[placeholder] = value
        self.session.run(self.apply, fed)
        self.previous = current
        return float(loss)

    def get_weights(self) -> dict[str, np.ndarray]:
        """Every global variable, as Trainer.get_weights names them, and the previous weights
        under their pipedream-2bw names."""
        weights = self.session.run(self.reads)
        weights.update((previous_weights_name(n), v) for n, v in self.previous.items())
        return weights

    def close(self):
        self.session.close()


def _placeholder_like(gradient, variable):
    """A placeholder to feed `gradient`'s value: IndexedSlices stay IndexedSlices (the
    optimizer's sparse update)."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            v1.placeholder(gradient.values.dtype, gradient.values.shape),
            v1.placeholder(gradient.indices.dtype, [None]),
            tf.constant(variable.shape.as_list(), tf.int64),
        )
    return v1.placeholder(gradient.dtype, gradient.shape)
