"""TF collective keys and gradient buckets of the multi-rank runtime, without launching ranks."""

import numpy as np
import pytest
import tensorflow as tf

from graph_rewrite.collective_transport import (
    GROUP_KEY_BASE,
    REDUCE,
    UP,
    DOWN,
    CollectiveKeys,
    check_keys,
    fused_all_reduce_sum,
)

v1 = tf.compat.v1


def test_group_keys_are_distinct_for_every_pair_the_world_and_listed_groups():
    keys = CollectiveKeys(4, groups=[(0, 1, 2), (1, 2, 3)])
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    found = [keys.group_key(p) for p in pairs] + [
        keys.group_key(range(4)),
        keys.group_key((2, 1, 0)),
        keys.group_key((3, 2, 1)),
    ]
    assert len(set(found)) == len(found)
    assert keys.group_key((1, 0)) == keys.group_key((0, 1))
    assert keys.group_key(range(4)) == GROUP_KEY_BASE - 1
    with pytest.raises(KeyError, match=r"no collective group for ranks \[0, 2, 3\]"):
        keys.group_key((0, 2, 3))


def test_instance_keys_of_a_groups_streams_never_collide_and_count_per_stream():
    keys = CollectiveKeys(2)
    up = [keys.instance_key((0, 1), f"up{k}", UP) for k in range(5)]
    down = [keys.instance_key((1, 0), f"down{k}", DOWN) for k in range(3)]
    reduce = [keys.instance_key((0, 1), f"sum{k}", REDUCE) for k in range(4)]
    assert len(set(up + down + reduce)) == 12
    assert up == sorted(up) and down == sorted(down) and reduce == sorted(reduce)
    assert keys.names[((0, 1), DOWN)] == ["down0", "down1", "down2"]


def test_boundaries_between_the_same_two_ranks_number_their_pieces_apart():
    """interleaved-1f1b: ranks 0 and 1 hold stages [0, 2] and [1, 3], so the pair moves pieces
    across boundaries 0 -> 1, 2 -> 3 (and back); the two ranks create them in different
    interleavings, and every piece still gets the same key on both ranks."""
    pieces = [(a, b, i) for a, b in [(0, 1), (2, 3), (1, 0), (3, 2)] for i in range(3)]
    sender_order = sorted(pieces, key=lambda p: (p[2], p[0]))
    receiver_order = sorted(pieces, key=lambda p: (p[0], p[2]))
    assert sender_order != receiver_order
    found = []
    for order in (sender_order, receiver_order):
        keys = CollectiveKeys(2, num_stages=4)
        found.append(
            {
                (a, b, i): keys.instance_key(
                    (0, 1), f"mb{i}/s{a}_to_s{b}", keys.boundary_stream(a, b)
                )
                for a, b, i in order
            }
        )
        reductions = [keys.instance_key((0, 1), f"sum{k}", REDUCE) for k in range(3)]
        assert len(set(found[-1].values()) | set(reductions)) == len(pieces) + 3
    assert found[0] == found[1]
    with pytest.raises(ValueError, match="boundary s4 -> s0 is outside the 4 stages"):
        CollectiveKeys(2, num_stages=4).boundary_stream(4, 0)


def test_check_keys_names_the_ranks_and_the_first_collective_that_differs():
    mine = {((0, 1), UP): ["a", "b", "c"]}
    check_keys(mine, [mine, {((0, 1), UP): ["a", "b", "c"]}], rank=0)
    with pytest.raises(
        RuntimeError,
        match=r"ranks 0 and 1 from instance 2 on \(here \['b'\], "
        r"there \['x'\]",
    ):
        check_keys(mine, [mine, {((0, 1), UP): ["a", "x", "c"]}], rank=0)


def _reduce_ops(graph):
    return [op for op in graph.get_operations() if op.type == "CollectiveReduceV2"]


def test_small_gradients_share_a_bucket_large_ones_go_alone_and_values_come_back_in_shape():
    """A group of one rank (this process) runs the real collectives: each sum is the input."""
    rng = np.random.default_rng(0)
    values = {
        "a": rng.standard_normal((4, 3)).astype(np.float32),  # 48 B
        "b": rng.standard_normal((5,)).astype(np.float32),  # 20 B
        "big": rng.standard_normal((64, 64)).astype(np.float32),  # 16 KiB
        "c": rng.standard_normal((2, 2, 2)).astype(np.float32),
    }  # 32 B
    graph = tf.Graph()
    with graph.as_default():
        grads = {k: tf.constant(v) for k, v in values.items()}
        device = "/job:localhost/replica:0/task:0/device:CPU:0"
        out = fused_all_reduce_sum(
            grads,
            ["c", "big", "b", "a"],
            (0,),
            CollectiveKeys(1),
            {k: device for k in values},
            bucket_bytes=1024,
        )
        # buckets in order: [c], [big], [b, a]  (big exceeds the limit and splits the run)
        assert len(_reduce_ops(graph)) == 3
    with v1.Session(graph=graph) as session:
        got = session.run(out)
    for name, value in values.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
