"""The Profile: measured cost of each layer of a model (ARCHITECTURE.md, "Profile (contract)").

In memory: ordered layers with forward/backward milliseconds at the profile batch size,
activation bytes (tensors leaving the layer) and parameter bytes, the layer DAG edges, the
profile batch size and the device it was measured on. On disk: our JSON (this module) and the
PipeDream/DAPPLE `graph.txt` text format (`planner.graph_txt`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

PROFILE_FORMAT = "dapple-profile/1"


class ProfileError(ValueError):
    """A profile that cannot be read or is inconsistent; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    forward_ms: float
    backward_ms: float
    activation_bytes: float
    parameter_bytes: float
    # Free text shown to people (graph.txt node description); the name is the identifier.
    description: str = ""
    # Measured by our profiler, absent (None) in published profiles. Times: a least-squares fit
    # of the layer's time over two or more batch sizes, `fixed + per_row x rows` (ms).
    forward_fixed_ms: float | None = None
    forward_per_row_ms: float | None = None
    backward_fixed_ms: float | None = None
    backward_per_row_ms: float | None = None
    # Bytes at the profile batch of every forward tensor of this layer the gradient ops read.
    saved_bytes: float | None = None
    # Temporary bytes at the profile batch of the layer's two ops with the most (what an op
    # allocates beyond its outputs while it runs: a convolution's backward workspace, say).
    workspace_bytes: float | None = None
    # Bytes of the optimizer's slot variables of this layer's parameters (Adam: 2 x parameters).
    optimizer_slot_bytes: float | None = None
    # The optimizer's update of this layer's parameters, once per step (ms).
    apply_ms: float | None = None

    @property
    def has_fit(self) -> bool:
        return None not in (
            self.forward_fixed_ms,
            self.forward_per_row_ms,
            self.backward_fixed_ms,
            self.backward_per_row_ms,
        )

    def forward_ms_at(self, rows: float, batch_size: int) -> float:
        """Forward ms for `rows` rows: the fit where measured, else linear in rows."""
        if self.has_fit:
            return self.forward_fixed_ms + self.forward_per_row_ms * rows
        return self.forward_ms * rows / batch_size

    def backward_ms_at(self, rows: float, batch_size: int) -> float:
        if self.has_fit:
            return self.backward_fixed_ms + self.backward_per_row_ms * rows
        return self.backward_ms * rows / batch_size


# Fields of a layer that must be finite and >= 0 (None allowed for the optional ones).
MEASURED_FIELDS = (
    "forward_ms",
    "backward_ms",
    "activation_bytes",
    "parameter_bytes",
    "forward_fixed_ms",
    "forward_per_row_ms",
    "backward_fixed_ms",
    "backward_per_row_ms",
    "saved_bytes",
    "workspace_bytes",
    "optimizer_slot_bytes",
    "apply_ms",
)
OPTIONAL_FIELDS = MEASURED_FIELDS[4:]


@dataclasses.dataclass(frozen=True)
class Profile:
    layers: tuple[LayerCost, ...]
    edges: tuple[tuple[int, int], ...]  # (src layer index, dst layer index)
    batch_size: int
    device: str = "unknown"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "edges", tuple((int(a), int(b)) for a, b in self.edges))
        n = len(self.layers)
        for a, b in self.edges:
            if not (0 <= a < n and 0 <= b < n):
                raise ProfileError(f"edge {a} -> {b} names a layer outside 0..{n - 1}")

    def validate(self, source: str = "profile") -> None:
        """Raise ProfileError unless every time and size is finite and >= 0 and some layer has
        compute; the message names the layer and the field."""
        if self.batch_size <= 0:
            raise ProfileError(
                f"{source}: batch_size must be a positive row count, found {self.batch_size}"
            )
        for layer in self.layers:
            for name in MEASURED_FIELDS:
                value = getattr(layer, name)
                if value is None:
                    continue
                if not math.isfinite(value) or value < 0:
                    raise ProfileError(
                        f"{source}: layer {layer.name!r} field {name} must be a "
                        f"finite number >= 0, found {value!r}"
                    )
        if not any(l.forward_ms > 0 or l.backward_ms > 0 for l in self.layers):
            raise ProfileError(
                f"{source}: every layer has forward_ms = backward_ms = 0; expected "
                f"measured compute on at least one layer of "
                f"{len(self.layers)}"
            )

    def check_layers(self, model_layers: Sequence[str], source: str = "profile") -> None:
        """Raise ProfileError unless the profile's layers are exactly `model_layers`, in order."""
        model_layers, mine = list(model_layers), list(self.layer_names)
        if mine == model_layers:
            return
        extra = [n for n in mine if n not in model_layers]
        missing = [n for n in model_layers if n not in mine]
        what = (
            f"has layers the model lacks {extra[:5]}"
            if extra
            else f"lacks the model's layers {missing[:5]}"
            if missing
            else "lists the layers in another order than the model"
        )
        raise ProfileError(
            f"{source} {what}; the model's layers are {model_layers[:8]}"
            f"{' ...' if len(model_layers) > 8 else ''}, the profile's {mine[:8]}"
            f"{' ...' if len(mine) > 8 else ''}"
        )

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @classmethod
    def chain(cls, layers, batch_size: int, device: str = "unknown") -> "Profile":
        """A profile whose layers form a simple chain 0 -> 1 -> ... -> n-1."""
        layers = tuple(layers)
        return cls(layers, tuple((i, i + 1) for i in range(len(layers) - 1)), batch_size, device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "batch_size": self.batch_size,
            "device": self.device,
            "layers": [
                {
                    k: v
                    for k, v in dataclasses.asdict(layer).items()
                    if not (k in OPTIONAL_FIELDS and v is None)
                }
                for layer in self.layers
            ],
            "edges": [list(e) for e in self.edges],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<profile>") -> "Profile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ProfileError(f'{source}: expected "format": "{PROFILE_FORMAT}", found {found!r}')
        try:
            layers = tuple(
                LayerCost(
                    str(l["name"]),
                    float(l["forward_ms"]),
                    float(l["backward_ms"]),
                    float(l["activation_bytes"]),
                    float(l["parameter_bytes"]),
                    str(l.get("description", "")),
                    **{k: float(l[k]) for k in OPTIONAL_FIELDS if l.get(k) is not None},
                )
                for l in data["layers"]
            )
            profile = cls(
                layers,
                tuple(tuple(e) for e in data.get("edges", [])),
                int(data["batch_size"]),
                str(data.get("device", "unknown")),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ProfileError):
                raise ProfileError(f"{source}: {e}") from None
            raise ProfileError(
                f"{source}: malformed profile ({type(e).__name__}: {e}); expected "
                f"layers with name, forward_ms, backward_ms, activation_bytes, "
                f"parameter_bytes, and batch_size"
            ) from None
        profile.validate(source)
        return profile

    @classmethod
    def from_json(cls, text: str, source: str = "<profile>") -> "Profile":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike, batch_size: int | None = None) -> "Profile":
        """Read our JSON or a PipeDream/DAPPLE graph.txt (told apart by content). graph.txt has no
        batch size, so `batch_size` is required for it; for JSON it must agree if given."""
        from planner.graph_txt import load_profile

        return load_profile(path, batch_size)

    def save_json(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)
