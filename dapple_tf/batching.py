"""How a global batch splits for a plan given in DAPPLE notation (no TensorFlow needed, so
train.py's flag checks can use it before TensorFlow starts).

A plan with replica counts `r_s` splits each step's `global_batch_size` rows into `M`
micro-batches of `b = global_batch_size / M` rows, and replica `k` of stage `s` takes rows
`[k·b/r_s, (k+1)·b/r_s)` of each (ARCHITECTURE.md, Plan): so `M` must divide the global batch
and every `r_s` must divide `b`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class BatchError(ValueError):
    """The global batch cannot be split as the plan needs; the message says how to fix it."""


def notation_micro_batches(
    replicas: Sequence[int], global_batch_size: int, requested: int | None = None
) -> int:
    """The micro-batch count of a notation plan: `requested` if the batch allows it, else (none
    requested) the largest count up to 2 x stages that the batch allows."""
    notation = ":".join(map(str, replicas)) if len(replicas) > 1 else f"DP{replicas[0]}"
    multiple = math.lcm(*replicas)
    if requested is not None:
        fitting_batch = requested * multiple * _rows_hint(global_batch_size, requested * multiple)
        if global_batch_size % requested:
            raise BatchError(
                f"--global_batch_size={global_batch_size} does not divide into "
                f"--num_micro_batches={requested}"
            )
        if (global_batch_size // requested) % multiple:
            raise BatchError(
                f"plan {notation}: micro-batches of {global_batch_size // requested} rows "
                f"(--global_batch_size={global_batch_size} / --num_micro_batches={requested}) do "
                f"not divide by every stage's replica count (need a multiple of {multiple}); "
                f"e.g. --global_batch_size={fitting_batch}"
            )
        return requested
    for count in range(2 * len(replicas), 0, -1):
        if global_batch_size % count == 0 and (global_batch_size // count) % multiple == 0:
            return count
    raise BatchError(
        f"plan {notation} needs micro-batches whose row count divides by every stage's replica "
        f"count (a multiple of {multiple}), but --global_batch_size={global_batch_size} is not "
        f"a multiple of {multiple}; use e.g. --global_batch_size="
        f"{multiple * _rows_hint(global_batch_size, multiple)}"
    )


def _rows_hint(global_batch_size: int, unit: int) -> int:
    """How many `unit`s make the smallest batch of at least `global_batch_size` rows."""
    return max(1, -(-global_batch_size // unit))
