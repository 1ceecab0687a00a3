"""PipeDream/DAPPLE `graph.txt` profiles, read and written (ARCHITECTURE.md, "Profile").

Node lines:  `<id> -- <description> -- forward_compute_time=<ms>, backward_compute_time=<ms>,
              activation_size=<bytes or [a; b; ...]>, parameter_size=<bytes>`
Edge lines:  `<indent><src id> -- <dst id>` (indent: a tab or spaces).

A layer's name is its node id (descriptions repeat, e.g. `LSTM(1024, 1024)` in GNMT); the description
is kept in `LayerCost.description`. A list activation size is summed. The file carries no batch
size: the caller gives it. Nothing is dropped or zeroed here; cost models decide what `Input` and
`__getitem__` nodes mean.

Our profiler measures more than the four published metrics; those extra metrics follow them on
the node line (`, forward_fixed_time=<ms>, forward_per_row_time=<ms>, backward_fixed_time=<ms>,
backward_per_row_time=<ms>, saved_size=<bytes>, workspace_size=<bytes>, optimizer_slot_size=<bytes>,
apply_time=<ms>`,
each optional), so a
graph.txt keeps everything a JSON profile does.
"""

from __future__ import annotations

import os
import re

from planner.profile import LayerCost, Profile, ProfileError

_METRICS = ("forward_compute_time", "backward_compute_time", "activation_size", "parameter_size")
# Optional metrics after the four above: graph.txt key -> LayerCost field.
_EXTRA_METRICS = {
    "forward_fixed_time": "forward_fixed_ms",
    "forward_per_row_time": "forward_per_row_ms",
    "backward_fixed_time": "backward_fixed_ms",
    "backward_per_row_time": "backward_per_row_ms",
    "saved_size": "saved_bytes",
    "workspace_size": "workspace_bytes",
    "optimizer_slot_size": "optimizer_slot_bytes",
    "apply_time": "apply_ms",
}
_NODE_FORMAT = (
    "<id> -- <description> -- forward_compute_time=<ms>, backward_compute_time=<ms>, "
    "activation_size=<bytes or [a; b]>, parameter_size=<bytes>"
)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _number(text: str, where: str, what: str) -> float:
    text = text.strip()
    if not _NUMBER.match(text):
        raise ProfileError(f"{where}: expected a number for {what}, found {text!r}")
    return float(text)


def _parse_metrics(text: str, where: str) -> tuple[list[float], dict[str, float]]:
    # Split on ", " only outside brackets: activation lists use "; " but be lenient with ",".
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    if len(parts) < len(_METRICS):
        raise ProfileError(
            f"{where}: expected {len(_METRICS)} metrics "
            f"({', '.join(m + '=...' for m in _METRICS)}), found {text.strip()!r}"
        )
    extras = {}
    for part in parts[len(_METRICS) :]:
        name, eq, value = part.strip().partition("=")
        if not eq or name.strip() not in _EXTRA_METRICS or _EXTRA_METRICS[name.strip()] in extras:
            raise ProfileError(
                f"{where}: after the four metrics expected optional ones "
                f"({', '.join(k + '=<number>' for k in _EXTRA_METRICS)}), each "
                f"once, found {part.strip()!r}"
            )
        extras[_EXTRA_METRICS[name.strip()]] = _number(value, where, name.strip())
    values = []
    for part, key in zip(parts, _METRICS):
        name, eq, value = part.strip().partition("=")
        if not eq or name.strip() != key:
            raise ProfileError(f"{where}: expected '{key}=<number>', found {part.strip()!r}")
        value = value.strip()
        if key == "activation_size" and value.startswith("["):
            if not value.endswith("]"):
                raise ProfileError(
                    f"{where}: expected a list like [a; b] for activation_size, found {value!r}"
                )
            items = [v for v in re.split(r"[;,]", value[1:-1]) if v.strip()]
            values.append(sum(_number(v, where, key) for v in items))
        else:
            values.append(_number(value, where, key))
    return values, extras


def parse_graph_txt(
    text: str, batch_size: int, source: str = "<graph.txt>", device: str = "unknown"
) -> Profile:
    """Parse graph.txt `text`; errors name `source`, the line number and what was expected."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ProfileError(
            f"{source}: a graph.txt profile needs a positive profile batch size "
            f"(--profile-batch-size), got {batch_size!r}"
        )
    layers: list[LayerCost] = []
    index: dict[str, int] = {}
    raw_edges: list[tuple[str, str, int]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        if line[0] in " \t":
            parts = line.strip().split(" -- ")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise ProfileError(
                    f"{where}: expected an edge line '<indent><src id> -- <dst id>', "
                    f"found {line.strip()!r}"
                )
            raw_edges.append((parts[0].strip(), parts[1].strip(), lineno))
            continue
        parts = line.strip().split(" -- ")
        if len(parts) < 3:
            raise ProfileError(
                f"{where}: expected a node line '{_NODE_FORMAT}', found {line.strip()!r}"
                f" (edge lines must be indented)"
            )
        node_id, desc, metrics = parts[0].strip(), " -- ".join(parts[1:-1]), parts[-1]
        if len(parts) > 3 and parts[-1].strip().startswith("stage_id="):
            # PipeDream writes an optional trailing "-- stage_id=<k>"; it is not ours to keep.
            desc, metrics = " -- ".join(parts[1:-2]), parts[-2]
        if not node_id or " " in node_id:
            raise ProfileError(f"{where}: expected a node id without spaces, found {node_id!r}")
        if node_id in index:
            raise ProfileError(f"{where}: node id {node_id!r} defined twice")
        (fwd, bwd, act, par), extras = _parse_metrics(metrics, where)
        index[node_id] = len(layers)
        layers.append(LayerCost(node_id, fwd, bwd, act, par, desc, **extras))
    if not layers:
        raise ProfileError(f"{source}: expected node lines ('{_NODE_FORMAT}'), found none")
    edges = []
    for src, dst, lineno in raw_edges:
        for node in (src, dst):
            if node not in index:
                raise ProfileError(
                    f"{source}:{lineno}: edge names node {node!r}, which no node line defines"
                )
        edges.append((index[src], index[dst]))
    profile = Profile(tuple(layers), tuple(edges), batch_size, device)
    profile.validate(source)
    return profile


def _fmt(x: float) -> str:
    return repr(float(x)) if float(x) != int(x) or abs(x) >= 1e16 else f"{x:.3f}"


def format_graph_txt(profile: Profile) -> str:
    """graph.txt text for `profile`; reading it back gives an equal profile (names, costs, edges)."""
    lines = []
    for layer in profile.layers:
        if " " in layer.name or " -- " in (layer.description or ""):
            raise ProfileError(
                f"layer {layer.name!r} cannot be written to graph.txt: ids have no "
                f"spaces and descriptions no ' -- '"
            )
        lines.append(
            f"{layer.name} -- {layer.description or layer.name} -- "
            f"forward_compute_time={_fmt(layer.forward_ms)}, "
            f"backward_compute_time={_fmt(layer.backward_ms)}, "
            f"activation_size={_fmt(layer.activation_bytes)}, "
            f"parameter_size={_fmt(layer.parameter_bytes)}"
            + "".join(
                f", {key}={_fmt(getattr(layer, field))}"
                for key, field in _EXTRA_METRICS.items()
                if getattr(layer, field) is not None
            )
        )
    for a, b in profile.edges:
        lines.append(f"\t{profile.layers[a].name} -- {profile.layers[b].name}")
    return "\n".join(lines) + "\n"


def write_graph_txt(profile: Profile, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(format_graph_txt(profile))
    os.replace(tmp, path)


def load_profile(path: str | os.PathLike, batch_size: int | None = None) -> Profile:
    """Our JSON profile or a graph.txt, told apart by the first non-blank character."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
    if text.lstrip().startswith("{"):
        profile = Profile.from_json(text, source=str(path))
        if batch_size is not None and batch_size != profile.batch_size:
            raise ProfileError(
                f"{path}: profile batch size is {profile.batch_size} in the file but "
                f"{batch_size} was given; drop --profile-batch-size or make them agree"
            )
        return profile
    if batch_size is None:
        raise ProfileError(
            f"{path}: a graph.txt profile does not record its batch size; give it "
            f"(--profile-batch-size / batch_size=)"
        )
    return parse_graph_txt(text, batch_size, source=str(path))
