"""Horovod collectives over groups of ranks that keep the ranks' variables and steps in
agreement: a variable's gradient summed over the ranks that use it (`allreduce_gradient`, or
`allgather_rows` to keep a sparse gradient sparse), its initial value broadcast from the lowest
of them (`broadcast_variable`), a scalar summed over every rank (`sum_over_all_ranks`) and the
step's last collective (`step_end`). Each runs on the group's process set (process_sets.py) and
is recorded in the rank's CollectiveLog (rank_failures.py). Used by multirank.py and by
graph_rewrite/horovod_transport.py's HorovodGradientSync.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from . import comm
from .process_sets import ProcessSets, rank_group
from .rank_failures import CollectiveLog


class GradientReduction:
    """The reductions of one rank, on the sets of `process_sets`, each recorded in `log`. All
    methods add ops to the default graph."""

    def __init__(self, process_sets: ProcessSets, log: CollectiveLog):
        self.process_sets = process_sets
        self.log = log

    def allreduce_gradient(self, grad, variable_name: str, ranks: Iterable[int]):
        """Sum a gradient over `ranks` (a stage's replicas, or all users of a tied variable).
        Per-tensor allreduce: grouped_allreduce is not used on process sets (see
        process_sets.py)."""
        import tensorflow as tf

        hvd = comm.horovod()
        group = rank_group(ranks)
        if len(group) == 1:
            return grad
        if isinstance(grad, tf.IndexedSlices):
            grad = tf.convert_to_tensor(grad)
        name = "dapple/allreduce/" + variable_name.replace(":", "_")
        self.log.add(name, group)
        ps = self.process_sets.get(group)
        return comm.named(
            lambda leaf: hvd.allreduce(grad, op=hvd.Sum, name=leaf, process_set=ps), name
        )

    def allgather_rows(self, grad, variable_name: str, ranks: Iterable[int]):
        """Sum an IndexedSlices gradient over `ranks`, keeping it sparse: the rows (values and
        indices) of every rank, concatenated in rank order (the optimizer sums duplicates)."""
        import tensorflow as tf

        hvd = comm.horovod()
        group = rank_group(ranks)
        ps = self.process_sets.get(group)
        base = "dapple/allgather/" + variable_name.replace(":", "_")
        self.log.add(base + "/values", group)
        self.log.add(base + "/indices", group)
        values = comm.named(
            lambda leaf: hvd.allgather(grad.values, name=leaf, process_set=ps), base + "/values"
        )
        indices = comm.named(
            lambda leaf: hvd.allgather(tf.cast(grad.indices, tf.int64), name=leaf, process_set=ps),
            base + "/indices",
        )
        return tf.IndexedSlices(values, indices, grad.dense_shape)

    def broadcast_variable(self, variable, variable_name: str, ranks: Iterable[int]):
        """An op that sets `variable` on every rank of `ranks` to its value on the lowest one."""
        hvd = comm.horovod()
        group = rank_group(ranks)
        name = "dapple/init/" + variable_name.replace(":", "_")
        self.log.add(name, group)
        ps = self.process_sets.get(group)
        value = comm.named(
            lambda leaf: hvd.broadcast(
                variable.read_value(), root_rank=group[0], name=leaf, process_set=ps
            ),
            name,
        )
        return variable.assign(value, read_value=False)

    def sum_over_all_ranks(self, tensor, name: str):
        """The sum of `tensor` over every rank of the job (each rank must create it)."""
        hvd = comm.horovod()
        self.log.add(name, range(hvd.size()))
        return comm.named(
            lambda leaf: hvd.allreduce(_unfoldable(tensor), op=hvd.Sum, name=leaf), name
        )

    def step_end(self, local_loss, control_inputs: Sequence = ()):
        """The last collective of every step, on all ranks: sums each rank's share of the loss
        (zero on ranks without the loss stage) after everything in `control_inputs` ran. No rank
        leaves a step before all ranks reached its end, so no rank can run ahead into
        collectives its peers will never join (Horovod would shut down for everyone)."""
        import tensorflow as tf

        hvd = comm.horovod()
        self.log.add("dapple/step_end", range(hvd.size()))
        with tf.control_dependencies(list(control_inputs)):
            local_loss = _unfoldable(local_loss)
        return comm.named(
            lambda leaf: hvd.allreduce(local_loss, op=hvd.Sum, name=leaf), "dapple/step_end"
        )


def _unfoldable(tensor):
    """`tensor` + 0, where the 0 comes from a stateful op, so that the collective it feeds never
    has constant inputs (see comm.session_config; belt and braces for small tensors)."""
    import tensorflow as tf

    tensor = tf.convert_to_tensor(tensor)
    return tensor + tf.raw_ops.Empty(shape=[], dtype=tensor.dtype, init=True)
