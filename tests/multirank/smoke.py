"""Horovod smoke check (3 ranks, graph mode): a global allreduce, and an allreduce and a
broadcast on the 2-rank process set {0, 1}. Each rank prints 'SMOKE {json}'."""

import json
import os

os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

tf.compat.v1.disable_eager_execution()
hvd.init(process_sets="dynamic")
rank = hvd.rank()
pair = hvd.add_process_set([0, 1])  # every rank registers it, also rank 2
facts = {
    "rank": rank,
    "size": hvd.size(),
    "pair_size": pair.size(),
    "in_pair": bool(pair.included()),
}

value = tf.constant(np.arange(3, dtype=np.float32) + 10 * rank)
fetch = {"global_sum": hvd.allreduce(value, op=hvd.Sum, name="smoke_global_sum")}
if rank in (0, 1):
    fetch["pair_sum"] = hvd.allreduce(value, op=hvd.Sum, name="smoke_pair_sum", process_set=pair)
    fetch["pair_bcast_from_1"] = hvd.broadcast(
        value, root_rank=1, name="smoke_pair_bcast", process_set=pair
    )
# Last collective on all ranks: no rank shuts Horovod down while another still uses it.
with tf.control_dependencies(list(fetch.values())):
    done = hvd.allreduce(tf.constant(1.0), op=hvd.Sum, name="smoke_done")
with tf.compat.v1.Session() as session:
    got = session.run({**fetch, "done": done})
print(
    "SMOKE " + json.dumps({**facts, **{k: np.asarray(v).tolist() for k, v in got.items()}}),
    flush=True,
)
