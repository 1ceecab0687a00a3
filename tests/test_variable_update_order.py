"""Every read of a variable in a pipelined training step runs before the step updates it.

Checked on the graph the session executes (partition graphs, after the stage-function calls
are inlined; cross-device edges followed from each _Send to its _Recv): every ReadVariableOp
or ResourceGather of a variable is an ancestor of every op of the step that writes it
(optimizer apply, moving-statistics assign). An unordered pair is a race: under load the read
may run after the in-place update and see the next step's weights. That race was real: with the
transposed-weights pass on, a forward's read of a weight feeds only its backward, and the
optimizer updated that weight first in 3 of 399 five-step runs of the MLP 3:1 plan (oneDNN,
2 cores shared with 3 busy loops): the first layer's gradient was off by up to 5.7e-4 and the
equivalence tests failed at random, in CI too."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import batch_norm_model
import rewrite_models as models
from dapple_tf import compat
from dapple_tf.trainer import Trainer
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

v1 = tf.compat.v1
GLOBAL_BATCH = 24
READS = {"ReadVariableOp", "ResourceGather", "ResourceGatherNd"}
WRITES_PREFIXES = ("ResourceApply", "ResourceSparseApply", "Assign")  # Assign(Add|Sub)VariableOp


def _tensor_op(name: str) -> str:
    return name.lstrip("^").split(":")[0]


def executed_graph(trainer, batch):
    """Node name -> NodeDef and node name -> the names of its inputs, over all partition graphs
    of one training step, with each _Recv also reading its _Send."""
    options = v1.RunOptions(output_partition_graphs=True)
    metadata = v1.RunMetadata()
    trainer.session.run(
        [trainer.train_op, trainer.loss],
        trainer._feed(batch),
        options=options,
        run_metadata=metadata,
    )
    nodes, inputs, sends = {}, collections.defaultdict(set), {}
    for partition in metadata.partition_graphs:
        for node in partition.node:
            nodes[node.name] = node
            inputs[node.name].update(_tensor_op(i) for i in node.input)
            if node.op == "_Send":
                sends[_transfer_key(node)] = node.name
    for name, node in nodes.items():
        if node.op == "_Recv" and _transfer_key(node) in sends:
            inputs[name].add(sends[_transfer_key(node)])
    return nodes, inputs


def _transfer_key(node):
    return tuple(node.attr[k].s for k in ("tensor_name", "send_device", "recv_device"))


def variable_of(name, nodes, inputs):
    """The variable (VarHandleOp's shared name) a resource input comes from, through identities
    and device transfers."""
    seen = set()
    while name not in seen:
        seen.add(name)
        node = nodes[name]
        if node.op in ("VarHandleOp", "_VarHandlesOp"):
            return node.attr["shared_name"].s.decode() or node.name
        data = [_tensor_op(i) for i in node.input if not i.startswith("^")]
        if node.op == "_Recv":
            data = [i for i in inputs[name]]
        if not data:
            return None
        name = data[0]
    return None


def reads_and_writes(nodes, inputs):
    """variable -> its read ops, variable -> its write ops, in the executed graph."""
    reads, writes = collections.defaultdict(list), collections.defaultdict(list)
    for name, node in nodes.items():
        if not node.input:
            continue
        resource = _tensor_op(node.input[0])
        if node.op in READS:
            reads[variable_of(resource, nodes, inputs)].append(name)
        elif node.op.startswith(WRITES_PREFIXES):
            writes[variable_of(resource, nodes, inputs)].append(name)
    return reads, writes


def reads_not_before_update(trainer, batch):
    """(read op, write op, variable) for every read of a variable that is not an ancestor of an
    op of the same step that writes the variable."""
    nodes, inputs = executed_graph(trainer, batch)
    reads, writes = reads_and_writes(nodes, inputs)
    ancestors = {}

    def ancestors_of(name):
        if name not in ancestors:
            found, stack = set(), [name]
            while stack:
                for parent in inputs[stack.pop()]:
                    if parent not in found:
                        found.add(parent)
                        stack.append(parent)
            ancestors[name] = found
        return ancestors[name]

    assert writes, "the step writes no variable: the check would be empty"
    return [
        (read, write, variable)
        for variable, ops in writes.items()
        for write in ops
        for read in reads.get(variable, [])
        if read not in ancestors_of(write)
    ]


def optimizer():
    return v1.train.MomentumOptimizer(0.1, momentum=0.9)


CASES = [
    ("mlp", [3, 1], "gpipe", 2),
    ("mlp", [1, 1], "1f1b", 4),
    ("mlp", [1, 1, 1, 1], "1f1b", 4),
    ("transformer", [2, 2], "1f1b", 2),
    ("transformer", [1, 1], "gpipe", 4),
    ("rnn", [1, 1], "1f1b", 2),
    ("batch_norm", [1, 1], "1f1b", 2),
]


def model_case(name):
    if name == "batch_norm":
        return models.ModelCase(
            "batch_norm",
            batch_norm_model.model(),
            batch_norm_model.SPEC,
            batch_norm_model.make_batch,
        )
    return models.ALL[name]


ZB_H1_CASES = [
    ("mlp", [1, 1], "zb-h1", 4),
    ("mlp", [1, 1, 1, 1], "zb-h1", 4),
    ("transformer", [2, 2], "zb-h1", 2),
    ("rnn", [1, 1], "zb-h1", 2),
    ("batch_norm", [1, 1], "zb-h1", 2),
]


# interleaved-1f1b: `replicas` per device group, 2 stages per group (stage s on group s mod P)
INTERLEAVED_CASES = [
    ("mlp", [1, 1], "interleaved-1f1b", 4),
    ("transformer", [2, 2], "interleaved-1f1b", 2),
    ("rnn", [1, 1], "interleaved-1f1b", 2),
    ("batch_norm", [1, 1], "interleaved-1f1b", 2),
]


TWO_BW_CASES = [
    ("mlp", [1, 1], "pipedream-2bw", 4),
    ("transformer", [2, 2], "pipedream-2bw", 2),
    ("rnn", [1, 1], "pipedream-2bw", 2),
]


@pytest.mark.parametrize("stacked", [False, True], ids=["per-micro-batch", "stacked"])
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
@pytest.mark.parametrize(
    "model,replicas,schedule,num_micro_batches",
    CASES,
    ids=[f"{m}-{':'.join(map(str, r))}-{s}-{n}" for m, r, s, n in CASES],
)
def test_every_read_of_a_variable_runs_before_its_update(
    monkeypatch, model, replicas, schedule, num_micro_batches, transposed, stacked, chunks=1
):
    trainer, batch = make_trainer(
        monkeypatch, model, replicas, schedule, num_micro_batches, transposed, stacked, chunks
    )
    try:
        assert reads_not_before_update(trainer, batch) == []
    finally:
        trainer.close()


def make_trainer(
    monkeypatch,
    model,
    replicas,
    schedule,
    num_micro_batches,
    transposed,
    stacked,
    chunks=1,
    **options,
):
    """The trainer and a batch of one case (the transposed-weights pass on or off; `chunks`
    stages per device group: interleaved-1f1b)."""
    monkeypatch.setattr(compat, "onednn_enabled", lambda: transposed)
    case = model_case(model)
    layers = build_template(case.model_fn, case.feature_spec).layers
    plan = even_plan(layers, replicas, GLOBAL_BATCH, num_micro_batches, schedule, chunks)
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer,
        plan,
        GLOBAL_BATCH,
        seed=3,
        optimize_graph=False,
        stack_weight_gradients=stacked,
        **options,
    )
    if transposed and model != "rnn":
        assert any(s.transposed_weights for s in trainer.rewritten.stage_graphs)
    return trainer, case.make_batch(np.random.default_rng(0), GLOBAL_BATCH)


@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
@pytest.mark.parametrize(
    "model,replicas,schedule,num_micro_batches",
    ZB_H1_CASES,
    ids=[f"{m}-{':'.join(map(str, r))}-{s}-{n}" for m, r, s, n in ZB_H1_CASES],
)
def test_every_read_of_a_variable_runs_before_its_update_under_zb_h1(
    monkeypatch, model, replicas, schedule, num_micro_batches, transposed
):
    """The W calls read variables too (and the forwards' variable reads they take): the update
    waits for them as for every forward and backward call."""
    test_every_read_of_a_variable_runs_before_its_update(
        monkeypatch, model, replicas, schedule, num_micro_batches, transposed, stacked=False
    )


@pytest.mark.parametrize("stacked", [False, True], ids=["per-micro-batch", "stacked"])
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
@pytest.mark.parametrize(
    "model,replicas,schedule,num_micro_batches",
    INTERLEAVED_CASES,
    ids=[f"{m}-{':'.join(map(str, r))}-{s}-{n}" for m, r, s, n in INTERLEAVED_CASES],
)
def test_every_read_of_a_variable_runs_before_its_update_under_interleaved_1f1b(
    monkeypatch, model, replicas, schedule, num_micro_batches, transposed, stacked
):
    """Several stages per device: every call of each of them is waited for."""
    test_every_read_of_a_variable_runs_before_its_update(
        monkeypatch, model, replicas, schedule, num_micro_batches, transposed, stacked, chunks=2
    )


@pytest.mark.parametrize("stacked", [False, True], ids=["per-micro-batch", "stacked"])
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
@pytest.mark.parametrize(
    "model,replicas,schedule,num_micro_batches",
    TWO_BW_CASES,
    ids=[f"{m}-{':'.join(map(str, r))}-{s}-{n}" for m, r, s, n in TWO_BW_CASES],
)
def test_under_2bw_the_calls_read_only_the_previous_weights_and_before_their_copy(
    monkeypatch, model, replicas, schedule, num_micro_batches, transposed, stacked
):
    """pipedream-2bw (graph_rewrite/weight_versions.py): every read of a variable runs before
    the step's writes of it, the previous weights included: the calls' reads of W(t-1) before
    the copy of W(t) into them, the copy's reads of W(t) before the optimizer's update. And
    the step reads the trainable variables themselves only to copy them."""
    trainer, batch = make_trainer(
        monkeypatch,
        model,
        replicas,
        schedule,
        num_micro_batches,
        transposed,
        stacked,
        allow_async=True,
    )
    try:
        assert reads_not_before_update(trainer, batch) == []
        nodes, inputs = executed_graph(trainer, batch)
        reads, writes = reads_and_writes(nodes, inputs)
        previous = {v.op.name: name for name, v in trainer.rewritten.previous_weights.items()}
        assert set(previous.values()) == {
            n for n, v in trainer.template.variables.items() if v.trainable
        }
        for name in previous:
            assert reads[name] and writes[name], name
        for name in previous.values():
            assert reads[name], name
            outside_copy = [
                r for r in reads[name] if not r.startswith("dapple/copy_previous_weights/")
            ]
            assert outside_copy == [], name
    finally:
        trainer.close()
