"""`ModelSpec`: what a model hands to the runtime (see ARCHITECTURE.md, "models/").

A spec is plain data plus functions:
- `model_fn(features) -> loss`: builds the model in the current tf.compat.v1 graph and returns
  the scalar mean loss over the rows of `features` (one row = one example).
- `feature_spec`: {feature name: (per-example shape, dtype)}; the batch dimension is not part of
  it and is dynamic in the graph.
- `layer_names`: the top-level name scopes `model_fn` creates, in creation order.
- `synthetic_batch(batch_size, rng)`: a random batch matching `feature_spec`.
- `input_fn(...)`: an iterator over batches read from files (numpy dicts), when the model has a
  reader; see each model's module for its arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import tensorflow as tf

FeatureSpec = Mapping[str, tuple[tuple[int, ...], tf.DType]]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    preset: str
    config: Any
    model_fn: Callable[[dict[str, tf.Tensor]], tf.Tensor]
    feature_spec: FeatureSpec
    layer_names: tuple[str, ...]
    synthetic_batch: Callable[[int, np.random.Generator], dict[str, np.ndarray]]
    input_fn: Callable[..., Iterator[dict[str, np.ndarray]]] | None
    default_global_batch_size: int
    default_optimizer: Callable[[], tf.compat.v1.train.Optimizer]

    def placeholders(self, batch_size: int | None = None) -> dict[str, tf.Tensor]:
        """Feature placeholders in the current graph (batch dimension `batch_size`, default
        dynamic), named after the features."""
        return {
            name: tf.compat.v1.placeholder(dtype, (batch_size,) + tuple(shape), name=name)
            for name, (shape, dtype) in self.feature_spec.items()
        }

    def check_batch(self, batch: Mapping[str, np.ndarray], source: str = "batch") -> int:
        """Raise ValueError unless `batch` matches feature_spec; return its row count."""
        rows = None
        for name, (shape, dtype) in self.feature_spec.items():
            if name not in batch:
                raise ValueError(
                    f"{source}: missing feature '{name}' expected by {self.name}/"
                    f"{self.preset} (features: {', '.join(self.feature_spec)})"
                )
            arr = np.asarray(batch[name])
            if tuple(arr.shape[1:]) != tuple(shape):
                raise ValueError(
                    f"{source}: feature '{name}' has per-example shape "
                    f"{tuple(arr.shape[1:])}, {self.name}/{self.preset} expects "
                    f"{tuple(shape)}"
                )
            if rows is None:
                rows = arr.shape[0]
            elif arr.shape[0] != rows:
                raise ValueError(
                    f"{source}: feature '{name}' has {arr.shape[0]} rows, earlier "
                    f"features have {rows}"
                )
        return int(rows or 0)


def adam(learning_rate: float) -> Callable[[], tf.compat.v1.train.Optimizer]:
    return lambda: tf.compat.v1.train.AdamOptimizer(learning_rate)


def momentum(
    learning_rate: float, value: float = 0.9
) -> Callable[[], tf.compat.v1.train.Optimizer]:
    return lambda: tf.compat.v1.train.MomentumOptimizer(learning_rate, value)


def resolve_config(
    model: str, presets: Mapping[str, Any], preset: str, overrides: Mapping[str, Any]
):
    """The preset's config dataclass with `overrides` applied; clear errors for unknown names."""
    if preset not in presets:
        raise ValueError(f"{model} has no preset '{preset}'; presets: {', '.join(presets)}")
    config = presets[preset]
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"{model} config has no field(s) {unknown}; fields: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(config, **overrides)
