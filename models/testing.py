"""Small plain-TF helpers for checking models: the layers a graph really has, and a reference
single-device training loop (one session, the spec's default optimizer, no dapple_tf)."""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import tensorflow as tf

from models.spec import ModelSpec

tf1 = tf.compat.v1


def session_config() -> tf1.ConfigProto:
    """A session config without Grappler: for test-sized graphs its rewrites cost seconds per
    new fetch set and buy nothing."""
    config = tf1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config


def top_level_scopes(graph: tf.Graph, exclude: Iterable[str] = ()) -> list[str]:
    """First path component of every op name, in order of first creation."""
    exclude = set(exclude)
    seen: dict[str, None] = {}
    for op in graph.get_operations():
        scope = op.name.split("/")[0]
        if scope not in exclude:
            seen.setdefault(scope, None)
    return list(seen)


def build_template(spec: ModelSpec, batch_size: int | None = None):
    """(graph, placeholders, loss) of `spec` in a fresh graph."""
    graph = tf.Graph()
    with graph.as_default():
        features = spec.placeholders(batch_size)
        loss = spec.model_fn(features)
    return graph, features, loss


class SessionTrainer:
    """Plain single-device training of a spec: the reference the pipelined runs are compared
    with, and the loop of the real-data tests."""

    def __init__(self, spec: ModelSpec, optimizer_fn=None, seed: int = 0):
        self.spec = spec
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf1.set_random_seed(seed)
            self.features = spec.placeholders()
            self.loss = spec.model_fn(self.features)
            self.variables = tf1.trainable_variables()
            optimizer = (optimizer_fn or spec.default_optimizer)()
            self.global_step = tf1.train.get_or_create_global_step()
            self.train_op = optimizer.minimize(self.loss, global_step=self.global_step)
            init = tf1.global_variables_initializer()
        self.session = tf1.Session(graph=self.graph, config=session_config())
        self.session.run(init)

    def _feed(self, batch: Mapping[str, np.ndarray]):
        return {self.features[name]: batch[name] for name in self.spec.feature_spec}

    def train_step(self, batch: Mapping[str, np.ndarray]) -> float:
        loss, _ = self.session.run([self.loss, self.train_op], self._feed(batch))
        return float(loss)

    def evaluate(self, batch: Mapping[str, np.ndarray]) -> float:
        return float(self.session.run(self.loss, self._feed(batch)))

    def get_weights(self) -> dict[str, np.ndarray]:
        values = self.session.run(self.variables)
        return {v.op.name: value for v, value in zip(self.variables, values)}

    def close(self):
        self.session.close()
