"""Boundary pass: row re-splitting between replica counts, op names, the Transport interface."""

import numpy as np
import tensorflow as tf

from dapple_tf import devices
from graph_rewrite.boundary import (
    ROWS,
    WHOLE,
    BoundaryTransfer,
    LocalTransport,
    endpoint_op_name,
)
from graph_rewrite.place import Slot
from planner.plan_format import Plan, Stage

v1 = tf.compat.v1


def _plan(replicas_a, replicas_b, gbs=12):
    return Plan(
        gbs,
        1,
        "gpipe",
        (
            Stage(("a",), tuple(range(replicas_a))),
            Stage(("b",), tuple(range(replicas_a, replicas_a + replicas_b))),
        ),
    )


def _overlaps(plan):
    return [
        (o.sender, o.receiver, o.begin, o.end, o.src_begin, o.dst_begin)
        for o in plan.row_overlaps(0, 1)
    ]


def test_row_overlaps_three_senders_to_one_receiver_concatenate_in_row_order():
    assert _overlaps(_plan(3, 1, gbs=6)) == [
        (0, 0, 0, 2, 0, 0),
        (1, 0, 2, 4, 0, 2),
        (2, 0, 4, 6, 0, 4),
    ]


def test_row_overlaps_one_sender_to_three_receivers_slice_its_block():
    assert _overlaps(_plan(1, 3, gbs=6)) == [
        (0, 0, 0, 2, 0, 0),
        (0, 1, 2, 4, 2, 0),
        (0, 2, 4, 6, 4, 0),
    ]


def test_row_overlaps_between_unaligned_replica_counts_cover_every_row_once():
    plan = _plan(3, 2)
    assert _overlaps(plan) == [
        (0, 0, 0, 4, 0, 0),
        (1, 0, 4, 6, 0, 4),
        (1, 1, 6, 8, 2, 0),
        (2, 1, 8, 12, 0, 2),
    ]
    covered = np.zeros(12, int)
    for o in plan.row_overlaps(0, 1):
        covered[o.begin : o.end] += 1
        assert o.num_rows == o.end - o.begin
    assert covered.tolist() == [1] * 12


def test_row_overlaps_of_equal_replica_counts_are_one_per_replica_pair():
    assert _overlaps(_plan(2, 2)) == [(0, 0, 0, 6, 0, 0), (1, 1, 6, 12, 0, 0)]


def test_endpoint_names_follow_the_contract():
    assert endpoint_op_name(3, 0, 2, "send", 0, 1) == "dapple/mb3/s0_to_s2/send"
    assert endpoint_op_name(3, 2, 0, "recv", 1, 2) == "dapple/mb3/s2_to_s0/recv_r1"


def _run(graph, fetches, num_devices):
    config = devices.session_config("CPU", num_devices)
    with v1.Session(graph=graph, config=config) as sess:
        return sess.run(fetches)


def test_forward_transfer_gives_each_receiver_its_rows_and_whole_tensors_to_all():
    plan = _plan(3, 2)
    slots = {Slot(0, k): devices.device_name(k, "CPU") for k in range(3)}
    slots.update({Slot(1, j): devices.device_name(3 + j, "CPU") for j in range(2)})
    rows = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)
    graph = tf.Graph()
    with graph.as_default():
        transfer = BoundaryTransfer(
            0,
            0,
            1,
            ("h:0", "w:0"),
            (ROWS, WHOLE),
            (tf.TensorSpec([2]), tf.TensorSpec([3])),
            plan,
            LocalTransport(slots),
        )
        for k in range(3):
            with tf.device(slots[Slot(0, k)]):
                transfer.send(
                    k,
                    [tf.constant(rows[4 * k : 4 * k + 4]), tf.constant([1.0, 2.0, 3.0]) * (k + 1)],
                )
        received = [transfer.recv(j) for j in range(2)]
        names = {op.name for op in graph.get_operations()}
    assert {"dapple/mb0/s0_to_s1/send_r0", "dapple/mb0/s0_to_s1/recv_r1"} <= names
    out = _run(graph, received, 5)
    np.testing.assert_array_equal(out[0][0], rows[:6])
    np.testing.assert_array_equal(out[1][0], rows[6:])
    for j in range(2):  # whole tensors come from sender replica 0
        np.testing.assert_array_equal(out[j][1], [1.0, 2.0, 3.0])


def test_gradient_of_a_whole_tensor_is_summed_into_replica_0_and_zero_elsewhere():
    plan = _plan(2, 2, gbs=4)
    slots = {Slot(s, k): devices.device_name(2 * s + k, "CPU") for s in range(2) for k in range(2)}
    graph = tf.Graph()
    with graph.as_default():
        backward = BoundaryTransfer(
            0,
            1,
            0,
            ("w:0",),
            (WHOLE,),
            (tf.TensorSpec([2]),),
            plan,
            LocalTransport(slots),
            gradient=True,
        )
        for j in range(2):
            backward.send(j, [tf.constant([1.0, 10.0]) * (j + 1)])
        like = [tf.zeros([2])]
        received = [backward.recv(k, like=like) for k in range(2)]
    out = _run(graph, received, 4)
    np.testing.assert_array_equal(out[0][0], [3.0, 30.0])
    np.testing.assert_array_equal(out[1][0], [0.0, 0.0])


class RecordingTransport(LocalTransport):
    """What a multi-rank transport sees: one transfer per (sender, receiver) piece set."""

    def __init__(self, slots):
        super().__init__(slots)
        self.calls = []

    def transfer(self, pieces, specs, from_slot, to_slot, name):
        self.calls.append((from_slot, to_slot, [tuple(s.shape.as_list()) for s in specs], name))
        return super().transfer(pieces, specs, from_slot, to_slot, name)


def test_transport_gets_one_transfer_per_overlapping_sender_receiver_pair_with_piece_shapes():
    plan = _plan(1, 2, gbs=4)
    slots = {
        Slot(0, 0): devices.device_name(0, "CPU"),
        Slot(1, 0): devices.device_name(1, "CPU"),
        Slot(1, 1): devices.device_name(2, "CPU"),
    }
    transport = RecordingTransport(slots)
    graph = tf.Graph()
    with graph.as_default():
        transfer = BoundaryTransfer(
            0, 0, 1, ("h:0",), (ROWS,), (tf.TensorSpec([5]),), plan, transport
        )
        transfer.send(0, [tf.zeros([4, 5])])
        transfer.recv(0)
        transfer.recv(1)
    assert transport.calls == [
        (Slot(0, 0), Slot(1, 0), [(2, 5)], "dapple/mb0/s0_to_s1/k0_j0"),
        (Slot(0, 0), Slot(1, 1), [(2, 5)], "dapple/mb0/s0_to_s1/k0_j1"),
    ]
