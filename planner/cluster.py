"""The Cluster: devices 0..N-1 grouped into hosts, link bandwidths and device memory.

Defaults are the DAPPLE paper's (ARCHITECTURE.md, "Cluster"): 25 GB/s NVLink p2p inside a host,
1 GB/s Ethernet p2p between hosts, 3 GB/s Ethernet NCCL allreduce between hosts, 16 GB V100s,
with 1 GB = 1e9 bytes. Hosts are given in DAPPLE's `seps` notation: cumulative host boundaries,
`[8, 16]` = host 0 holds devices 0-7 and host 1 devices 8-15.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from typing import Any, Sequence

GB = 1e9


class ClusterError(ValueError):
    """A cluster description that cannot be used; the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    seps: tuple[int, ...]
    intra_host_bandwidth: float = 25 * GB  # bytes/s, p2p inside a host (NVLink)
    inter_host_bandwidth: float = 1 * GB  # bytes/s, p2p between hosts (Ethernet)
    inter_host_allreduce_bandwidth: float = (
        3 * GB
    )  # bytes/s, NCCL allreduce bus bandwidth across hosts
    device_memory_bytes: float = 16 * GB
    # Used by the "runtime" cost model only (planner/runtime_cost.py); measured by
    # dapple_tf.auto_plan.runtime_cluster for this machine.
    transfer_latency_s: float = 0.0  # fixed cost of one boundary transfer
    accumulate_bandwidth: float = 100 * GB  # bytes/s of summing gradients on one device
    # Consecutive device ids that share one processor's cores (logical CPU devices of one
    # process: all of them). Work on such devices does not run in parallel for free.
    devices_per_processor: int = 1

    def __post_init__(self):
        seps = tuple(int(s) for s in self.seps)
        object.__setattr__(self, "seps", seps)
        object.__setattr__(self, "devices_per_processor", int(self.devices_per_processor))
        if self.devices_per_processor < 1:
            raise ClusterError(
                f"cluster devices_per_processor must be >= 1, got {self.devices_per_processor}"
            )
        if not self.transfer_latency_s >= 0:
            raise ClusterError(
                f"cluster transfer_latency_s must be >= 0, got {self.transfer_latency_s}"
            )
        if not seps or seps[0] <= 0 or any(b <= a for a, b in zip(seps, seps[1:])):
            raise ClusterError(
                f"cluster seps must be increasing positive device counts like [8, 16] "
                f"(cumulative host boundaries), got {list(seps)}"
            )
        for name in (
            "intra_host_bandwidth",
            "inter_host_bandwidth",
            "inter_host_allreduce_bandwidth",
            "device_memory_bytes",
            "accumulate_bandwidth",
        ):
            if not getattr(self, name) > 0:
                raise ClusterError(f"cluster {name} must be positive, got {getattr(self, name)}")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_seps(cls, seps: Sequence[int] | str, **overrides) -> "Cluster":
        """`Cluster.from_seps([8, 16])` or from the command-line text '8,16'."""
        if isinstance(seps, str):
            try:
                seps = [
                    int(x) for x in seps.replace("[", "").replace("]", "").split(",") if x.strip()
                ]
            except ValueError:
                raise ClusterError(
                    f"--cluster expects comma-separated cumulative host boundaries "
                    f"like 8,16, got {seps!r}"
                ) from None
        return cls(tuple(seps), **overrides)

    @classmethod
    def uniform(cls, num_hosts: int, devices_per_host: int, **overrides) -> "Cluster":
        return cls(tuple(devices_per_host * (h + 1) for h in range(num_hosts)), **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<cluster>") -> "Cluster":
        if not isinstance(data, dict) or "seps" not in data:
            raise ClusterError(
                f"{source}: expected a JSON object with 'seps' (e.g. [8, 16]) and "
                f"optional bandwidths in bytes/s and device_memory_bytes"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ClusterError(f"{source}: unknown cluster keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**{k: (tuple(v) if k == "seps" else float(v)) for k, v in data.items()})
        except (TypeError, ValueError) as e:
            if isinstance(e, ClusterError):
                raise ClusterError(f"{source}: {e}") from None
            raise ClusterError(f"{source}: malformed cluster ({e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Cluster":
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise ClusterError(f"cannot read cluster file {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ClusterError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seps"] = list(self.seps)
        return d

    # ---- topology -------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return self.seps[-1]

    @property
    def num_hosts(self) -> int:
        return len(self.seps)

    def host_of(self, device: int) -> int:
        return bisect.bisect_right(self.seps, device)

    def host_start(self, host: int) -> int:
        return self.seps[host - 1] if host > 0 else 0

    def processor_of(self, device: int) -> int:
        """Index of the processor whose cores `device` runs on (see devices_per_processor)."""
        return device // self.devices_per_processor

    def within_one_host(self, devices: Sequence[int]) -> bool:
        """True iff min and max device lie on the same host (the published planner's test)."""
        return self.host_of(min(devices)) == self.host_of(max(devices))
