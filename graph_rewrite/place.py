"""Device placement: which device each slot (stage replica) and each variable lives on."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from planner.plan_format import Plan

from .partition import StageSpec


@dataclasses.dataclass(frozen=True, order=True)
class Slot:
    """Replica `replica` of stage `stage`."""

    stage: int
    replica: int

    @property
    def tag(self) -> str:
        return f"s{self.stage}r{self.replica}"


def all_slots(plan: Plan) -> list[Slot]:
    return [Slot(s, k) for s, stage in enumerate(plan.stages) for k in range(stage.num_replicas)]


def slot_devices(plan: Plan, device_name: Callable[[int], str]) -> dict[Slot, str]:
    """Slot -> device string; `device_name` maps a plan device id to a local device name."""
    return {
        slot: device_name(plan.stages[slot.stage].devices[slot.replica]) for slot in all_slots(plan)
    }


def variable_devices(
    specs: list[StageSpec], local_slots: Iterable[Slot], device_of_slot: dict[Slot, str]
) -> dict[str, str]:
    """Each variable lives on the first local replica of the first stage that reads it (or, a
    moving statistic of batch norm, that updates it)."""
    local = sorted(local_slots)
    placement: dict[str, str] = {}
    for spec in specs:
        replicas = [slot for slot in local if slot.stage == spec.index]
        if not replicas:
            continue
        for v in spec.held_variables:
            placement.setdefault(v, device_of_slot[replicas[0]])
    return placement
