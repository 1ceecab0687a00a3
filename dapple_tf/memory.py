"""Live memory of a traced step, read from the allocator records in its step stats.

    _, metadata = trainer.traced_step(batch)
    peak = peak_live_bytes(metadata, device, re.compile(r"^dapple/mb\\d+/s0r0/"))

Every node's `memory[].allocation_records` lists (time, +bytes) when it allocated and
(time, -bytes) when the buffer was freed; the running sum over the clone ops of one stage is the
activation memory that stage holds, and its maximum over the step is the peak.
"""

from __future__ import annotations

import re

# Stage clones: dapple/mb<i>/s<stage>r<replica>/... (graph_rewrite/clone.py).
CLONE = re.compile(r"^dapple/mb\d+/s(\d+)r(\d+)/")


def peak_live_bytes(metadata, device: str, prefix: re.Pattern) -> int:
    """Peak of the running sum of allocator records (allocations +, frees -) of the stage clone
    nodes whose names match `prefix`, on `device` (a `RunMetadata` of a full-trace step)."""
    events = []
    for dev in metadata.step_stats.dev_stats:
        if dev.device != device:
            continue
        for node in dev.node_stats:
            if not CLONE.match(node.node_name) or not prefix.match(node.node_name):
                continue
            for memory in node.memory:
                for record in memory.allocation_records:
                    events.append((record.alloc_micros, record.alloc_bytes))
    live = peak = 0
    # at equal times, frees before allocations
    for _, delta in sorted(events, key=lambda e: (e[0], -e[1] < 0)):
        live += delta
        peak = max(peak, live)
    return peak


def stage_prefix(stage: int, replica: int = 0) -> re.Pattern:
    """Names of every micro-batch's clone ops of slot (stage, replica)."""
    return re.compile(rf"^dapple/mb\d+/s{int(stage)}r{int(replica)}/")
