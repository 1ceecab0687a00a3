"""TensorFlow's own cross-process runtime for a multi-rank run: one `tf.distribute.Server` per rank.

Horovod launches the ranks; this module gives every rank a TF server so that stage-boundary
tensors travel as TF collective broadcasts (graph_rewrite/collective_transport.py) instead of
Horovod broadcasts. Why: Horovod's single background thread serves every collective of a rank and
is starved when the rank's core computes (a 256 KB pair broadcast took 11-12 ms under load, 1.4-1.8
ms idle); TF's collective executor answers from gRPC threads woken by the data itself (about 1 ms
under the same load; issue #17).

At start-up each rank binds a free port, the (host, port) pairs are shared with a Horovod allgather,
and every rank starts a server of the job `worker` with task index = rank. Each rank's session
runs on its own server (`TFCluster.target`) and sees only its own task's devices
(`device_filters`); task 0 is the collective group leader (it resolves the groups of the
collectives). Device names of rank r: `/job:worker/replica:0/task:r/device:<kind>:0`.
"""

from __future__ import annotations

import dataclasses
import os
import socket

JOB = "worker"


@dataclasses.dataclass
class TFCluster:
    rank: int
    addresses: list[str]  # "host:port" of every rank, by rank
    server: object  # tf.distribute.Server of this rank
    config: object  # the ConfigProto the server was started with

    @property
    def target(self) -> str:
        return self.server.target

    def device(self, kind: str, rank: int | None = None) -> str:
        task = self.rank if rank is None else rank
        return f"/job:{JOB}/replica:0/task:{task}/device:{kind}:0"

    def session_config(self, base=None):
        """`base` (a ConfigProto) made fit for a session on this rank's server: the collective
        group leader set and only this rank's devices visible."""
        import tensorflow as tf

        config = tf.compat.v1.ConfigProto()
        if base is not None:
            config.CopyFrom(base)
        _cluster_settings(config, self.rank)
        return config


def _cluster_settings(config, rank: int) -> None:
    config.experimental.collective_group_leader = f"/job:{JOB}/replica:0/task:0"
    del config.device_filters[:]
    config.device_filters.append(f"/job:{JOB}/task:{rank}")


def advertised_host() -> str:
    """The address other ranks reach this rank's server at: DAPPLE_TF_HOST if set, else this
    host's name (every rank of a single-host run is on localhost)."""
    return os.environ.get("DAPPLE_TF_HOST") or socket.gethostname()


def free_port() -> int:
    """A TCP port that was free a moment ago (the server binds it right after the exchange)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start(rank: int, size: int, exchange, base_config=None) -> TFCluster:
    """Start this rank's server. `exchange(obj, name)` is an allgather of Python objects over all
    ranks (dapple_tf.comm.allgather_objects); every rank must call `start` at the same point."""
    import tensorflow as tf

    address = f"{advertised_host()}:{free_port()}"
    addresses = exchange(address, "dapple.tf_cluster.addresses")
    if len(addresses) != size:
        raise RuntimeError(f"rank {rank}: expected {size} server addresses, got {addresses}")
    cluster = tf.train.ClusterSpec({JOB: list(addresses)})
    config = tf.compat.v1.ConfigProto()
    if base_config is not None:
        config.CopyFrom(base_config)
    _cluster_settings(config, rank)
    try:
        server = tf.distribute.Server(
            cluster, job_name=JOB, task_index=rank, config=config, start=True
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the address that failed
        raise RuntimeError(
            f"rank {rank}: could not start the TensorFlow server at "
            f"{addresses[rank]} ({type(e).__name__}: {e}); set DAPPLE_TF_HOST "
            f"to an address the other ranks can reach"
        ) from e
    return TFCluster(rank, list(addresses), server, config)
