"""The Plan: how a model is split into pipeline stages and replicated (format "dapple-plan/1").

A plan is plain data shared by the planner (which writes it), the graph rewriter and the runtime
(which execute it). See ARCHITECTURE.md, "Plan (contract)".
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from planner import schedules

PLAN_FORMAT = "dapple-plan/1"


class PlanError(ValueError):
    """A plan that is malformed, or that cannot be executed on the model or devices at hand."""


@dataclasses.dataclass(frozen=True)
class Stage:
    layers: tuple[str, ...]
    devices: tuple[int, ...]

    @property
    def num_replicas(self) -> int:
        return len(self.devices)


@dataclasses.dataclass(frozen=True)
class RowOverlap:
    """Rows [begin, end) of a micro-batch that replica `sender` of one stage holds and replica
    `receiver` of another stage needs. `src_begin` and `dst_begin` are where those rows start
    in the sender's and the receiver's own rows (see Plan.row_overlaps)."""

    sender: int
    receiver: int
    begin: int
    end: int
    src_begin: int
    dst_begin: int

    @property
    def num_rows(self) -> int:
        return self.end - self.begin


@dataclasses.dataclass(frozen=True)
class Plan:
    global_batch_size: int
    num_micro_batches: int
    schedule: str
    stages: tuple[Stage, ...]
    predicted: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    # False only for plans kept for comparison that the runtime cannot execute (the planner's
    # "hpgo" model may split 1-row micro-batches over 15 replicas); such plans skip the row check.
    executable: bool = dataclasses.field(default=True, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(
            self,
            "stages",
            tuple(
                s if isinstance(s, Stage) else Stage(tuple(s["layers"]), tuple(s["devices"]))
                for s in self.stages
            ),
        )
        object.__setattr__(
            self,
            "stages",
            tuple(Stage(tuple(s.layers), tuple(int(d) for d in s.devices)) for s in self.stages),
        )
        self._check_shape()

    # ---- derived facts -------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // self.num_micro_batches

    @property
    def devices(self) -> tuple[int, ...]:
        """All device ids the plan uses, each once, in stage order."""
        return tuple(dict.fromkeys(d for s in self.stages for d in s.devices))

    @property
    def device_groups(self) -> tuple[tuple[int, ...], ...]:
        """The distinct device lists of the stages, in stage order: one per stage, or under
        interleaved-1f1b P groups, stage s on group s mod P."""
        return tuple(dict.fromkeys(s.devices for s in self.stages))

    @property
    def chunks(self) -> int:
        """Stages per device group (v): 1 but under an interleaved schedule."""
        return self.num_stages // len(self.device_groups)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(name for s in self.stages for name in s.layers)

    @property
    def notation(self) -> str:
        """DAPPLE notation: replicas per stage joined by ':' (e.g. '15:1'); one stage is 'DP<n>'."""
        if self.num_stages == 1:
            return f"DP{self.stages[0].num_replicas}"
        return ":".join(str(s.num_replicas) for s in self.stages)

    def stage_of_layer(self) -> dict[str, int]:
        return {name: i for i, s in enumerate(self.stages) for name in s.layers}

    def rows_of_replica(self, stage: int, replica: int) -> tuple[int, int]:
        """Row range [begin, end) of every micro-batch that replica `replica` of `stage` owns."""
        r = self.stages[stage].num_replicas
        per = self.micro_batch_size // r
        return replica * per, (replica + 1) * per

    def row_overlaps(self, from_stage: int, to_stage: int) -> list[RowOverlap]:
        """Every non-empty overlap of a `from_stage` replica's rows with a `to_stage` replica's
        rows, sorted by receiver replica, then by row: what crosses the boundary from_stage ->
        to_stage (equal replica counts: one overlap per replica; 3:1: three into the one
        receiver, concatenated in row order; 1:3: the sender's block cut in three)."""
        senders = [
            self.rows_of_replica(from_stage, k) for k in range(self.stages[from_stage].num_replicas)
        ]
        overlaps = []
        for j in range(self.stages[to_stage].num_replicas):
            r_begin, r_end = self.rows_of_replica(to_stage, j)
            for k, (s_begin, s_end) in enumerate(senders):
                begin, end = max(r_begin, s_begin), min(r_end, s_end)
                if begin < end:
                    overlaps.append(RowOverlap(k, j, begin, end, begin - s_begin, begin - r_begin))
        return overlaps

    # ---- validation -------------------------------------------------------------------------
    def _check_shape(self):
        if not self.stages:
            raise PlanError("plan has no stages")
        self._check_schedule()
        if self.global_batch_size <= 0 or self.num_micro_batches <= 0:
            raise PlanError(
                f"plan needs positive global_batch_size and num_micro_batches, got "
                f"{self.global_batch_size} and {self.num_micro_batches}"
            )
        if self.global_batch_size % self.num_micro_batches and self.executable:
            raise PlanError(
                f"global_batch_size {self.global_batch_size} does not divide into "
                f"{self.num_micro_batches} micro-batches"
            )
        b = self.micro_batch_size
        for i, s in enumerate(self.stages):
            if not s.layers:
                raise PlanError(f"stage {i} has no layers")
            if not s.devices:
                raise PlanError(f"stage {i} has no devices")
            if b % s.num_replicas and self.executable:
                raise PlanError(
                    f"micro-batch size {b} (= {self.global_batch_size} / {self.num_micro_batches}) "
                    f"does not divide by stage {i}'s {s.num_replicas} replicas; choose a global "
                    f"batch or micro-batch count so that every stage's replica count divides the "
                    f"micro-batch size"
                )
        for i, s in enumerate(self.stages):
            for d in s.devices:
                if d < 0:
                    raise PlanError(f"stage {i} names negative device id {d}")
        if self.schedule in schedules.CHUNKED:
            self._check_interleaved_groups()
        else:
            self._check_one_stage_per_device()
        seen_layers: dict[str, int] = {}
        for i, s in enumerate(self.stages):
            for name in s.layers:
                if name in seen_layers:
                    raise PlanError(
                        f"layer '{name}' appears in stage {seen_layers[name]} and stage {i}"
                    )
                seen_layers[name] = i

    def _check_one_stage_per_device(self):
        seen_devices: dict[int, int] = {}
        for i, s in enumerate(self.stages):
            for d in s.devices:
                if d in seen_devices:
                    raise PlanError(
                        f"device {d} is used by stage {seen_devices[d]} and stage {i}; "
                        f"a device holds exactly one stage replica (several stages per device "
                        f"only under schedule {' or '.join(schedules.CHUNKED)})"
                    )
                seen_devices[d] = i

    def _check_interleaved_groups(self):
        """Interleaved contract: P distinct device groups (stages 0..P-1), stage s on group
        s mod P (the same device list, in the same replica order), so every group holds
        v = S / P stages; no device in two groups; M a multiple of P."""
        groups = self.device_groups
        num_groups = len(groups)
        group_of_device: dict[int, int] = {}
        for g, devices in enumerate(groups):
            for d in devices:
                if d in devices[devices.index(d) + 1 :]:
                    raise PlanError(f"device {d} appears twice in device group {list(devices)}")
                if group_of_device.setdefault(d, g) != g:
                    raise PlanError(
                        f"device {d} is in device groups {list(groups[group_of_device[d]])} and "
                        f"{list(devices)}; under {self.schedule} a device belongs to one group "
                        f"(stage s on group s mod P, each group the same device list)"
                    )
        for s, stage in enumerate(self.stages):
            expected = groups[s % num_groups]
            if stage.devices != expected:
                raise PlanError(
                    f"{self.schedule} puts stage s on device group s mod P (P = {num_groups} "
                    f"groups {[list(g) for g in groups]}): stage {s} must be on "
                    f"{list(expected)}, the plan puts it on {list(stage.devices)}"
                )
        if self.num_stages % num_groups:
            raise PlanError(
                f"{self.schedule}: the {self.num_stages} stages do not divide over the "
                f"{num_groups} device groups {[list(g) for g in groups]}; every group holds the "
                f"same number of stages"
            )
        if self.num_micro_batches % num_groups:
            raise PlanError(
                f"{self.schedule} on {num_groups} device groups needs a multiple of "
                f"{num_groups} micro-batches, got {self.num_micro_batches}"
            )

    def _check_schedule(self):
        """Only schedules the rewriter can run (planner.schedules.EXECUTABLE)."""
        if self.schedule in schedules.EXECUTABLE:
            return
        runnable = ", ".join(schedules.EXECUTABLE)
        if self.schedule in schedules.SCHEDULES:
            raise PlanError(
                f"plan schedule '{self.schedule}' is in the schedule library, but the rewriter "
                f"cannot run it yet; runnable schedules: {runnable}"
            )
        raise PlanError(
            f"plan schedule '{self.schedule}' is unknown; runnable schedules: {runnable}"
        )

    @property
    def rows_divide(self) -> bool:
        """True iff every stage's replica count divides the micro-batch size."""
        return self.global_batch_size % self.num_micro_batches == 0 and all(
            self.micro_batch_size % s.num_replicas == 0 for s in self.stages
        )

    def check_layers(self, model_layers: Sequence[str]) -> None:
        """Raise PlanError unless the plan covers exactly `model_layers`, in order."""
        model_layers = list(model_layers)
        plan_layers = list(self.layers)
        if plan_layers == model_layers:
            return
        unknown = [n for n in plan_layers if n not in model_layers]
        missing = [n for n in model_layers if n not in plan_layers]
        if unknown:
            problem = f"names unknown layers {unknown}"
        elif missing:
            problem = f"skips layers {missing}"
        else:
            problem = "lists the layers out of model order"
        raise PlanError(
            f"plan {problem}; the model's layers, in order, are: {', '.join(model_layers)}"
        )

    def check_devices(self, num_available: int, what: str = "local devices") -> None:
        needed = max(self.devices) + 1
        if needed > num_available:
            raise PlanError(
                f"plan {self.notation} uses device ids up to {needed - 1} and needs "
                f"{needed} devices, but only {num_available} {what} are available"
            )

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "global_batch_size": self.global_batch_size,
            "num_micro_batches": self.num_micro_batches,
            "schedule": self.schedule,
            "stages": [{"layers": list(s.layers), "devices": list(s.devices)} for s in self.stages],
            "notation": self.notation,
            "predicted": dict(self.predicted),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<plan>") -> "Plan":
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != PLAN_FORMAT:
            raise PlanError(f'{source}: expected "format": "{PLAN_FORMAT}", found {fmt!r}')
        for key in ("global_batch_size", "num_micro_batches", "schedule", "stages"):
            if key not in data:
                raise PlanError(f"{source}: missing key '{key}'")
        stages = data["stages"]
        if not isinstance(stages, list):
            raise PlanError(f"{source}: 'stages' must be a list")
        for i, s in enumerate(stages):
            if (
                not isinstance(s, dict)
                or not isinstance(s.get("layers"), list)
                or not isinstance(s.get("devices"), list)
            ):
                raise PlanError(
                    f"{source}: stage {i} must be an object with lists 'layers' and 'devices'"
                )
        try:
            return cls(
                global_batch_size=int(data["global_batch_size"]),
                num_micro_batches=int(data["num_micro_batches"]),
                schedule=str(data["schedule"]),
                stages=tuple(stages),
                predicted=dict(data.get("predicted") or {}),
            )
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "<plan>") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise PlanError(f"cannot read plan file {path}: {e.strerror}") from None
        return cls.from_json(text, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file, then rename)."""
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)


def even_plan(
    layers: Sequence[str],
    replicas_per_stage: Sequence[int],
    global_batch_size: int,
    num_micro_batches: int,
    schedule: str = "1f1b",
    chunks: int = 1,
) -> Plan:
    """A plan that splits `layers` into len(replicas_per_stage) contiguous stages of near-equal
    layer count, stage i on the next replicas_per_stage[i] device ids. Handy for tests and for
    DAPPLE notation given on the command line (e.g. '3:1'). With `chunks` = v > 1
    (interleaved-1f1b), `replicas_per_stage` describes the P device groups and the layers split
    into v * P stages, stage s on group s mod P."""
    groups, device = [], 0
    for r in replicas_per_stage:
        groups.append(tuple(range(device, device + r)))
        device += r
    num_stages = len(groups) * chunks
    if num_stages > len(layers):
        raise PlanError(f"cannot split {len(layers)} layers into {num_stages} stages")
    stages, start = [], 0
    for i in range(num_stages):
        end = start + (len(layers) - start) // (num_stages - i)
        stages.append(Stage(tuple(layers[start:end]), groups[i % len(groups)]))
        start = end
    return Plan(global_batch_size, num_micro_batches, schedule, tuple(stages))


def parse_notation(notation: str) -> list[int]:
    """'15:1' -> [15, 1]; 'DP4' -> [4]."""
    text = notation.strip()
    if text.upper().startswith("DP") and text[2:].isdigit():
        return [int(text[2:])]
    parts = text.split(":")
    if not parts or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise PlanError(f"'{notation}' is not DAPPLE notation like '2:2' or '15:1'")
    return [int(p) for p in parts]
