"""The Profile: measured cost of each layer of a model (ARCHITECTURE.md, "Profile (contract)").

In memory: ordered layers with forward/backward milliseconds at the profile batch size,
activation bytes (tensors leaving the layer) and parameter bytes, the layer DAG edges, the
profile batch size and the device it was measured on. On disk: our JSON (this module) and the
PipeDream/DAPPLE `graph.txt` text format (`planner.graph_txt`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

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
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "edges": [list(e) for e in self.edges],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<profile>") -> "Profile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ProfileError(f"{source}: expected \"format\": \"{PROFILE_FORMAT}\", found {found!r}")
        try:
            layers = tuple(LayerCost(str(l["name"]), float(l["forward_ms"]), float(l["backward_ms"]),
                                     float(l["activation_bytes"]), float(l["parameter_bytes"]),
                                     str(l.get("description", "")))
                           for l in data["layers"])
            return cls(layers, tuple(tuple(e) for e in data.get("edges", [])),
                       int(data["batch_size"]), str(data.get("device", "unknown")))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ProfileError):
                raise ProfileError(f"{source}: {e}") from None
            raise ProfileError(f"{source}: malformed profile ({type(e).__name__}: {e}); expected "
                               f"layers with name, forward_ms, backward_ms, activation_bytes, "
                               f"parameter_bytes, and batch_size") from None

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
