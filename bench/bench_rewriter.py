"""Time to rewrite a 48-layer transformer template into 8 stages x 16 micro-batches.

    python bench/bench_rewriter.py [--blocks 48] [--stages 8] [--micro-batches 16]
                                   [--optimizer sgd|adam]  (default: both, SGD first)
    python bench/bench_rewriter.py --grid [--grid-blocks 12,24,48] [--grid-stages 2,4,8]
                                          [--grid-micro-batches 4,16,32]

Prints the template build time, the rewrite time with its phases (TrainingGraph.phase_seconds),
the op count of the training graph, and, for scale, how long plain TF takes to build the
single-device training graph of the same model (model_fn, tf.gradients, the optimizer) on this
machine, with the machine's cost of creating and of importing one op. Target: rewrite < 10 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dapple_tf.layers import layer  # noqa: E402
from graph_rewrite import build_template, rewrite  # noqa: E402
from planner.plan_format import even_plan  # noqa: E402

v1 = tf.compat.v1
SEQ, DIM, HEADS, VOCAB = 16, 64, 4, 1000


def _dense(x, units, name):
    w = v1.get_variable(f"{name}/kernel", [x.shape[-1], units])
    b = v1.get_variable(f"{name}/bias", [units], initializer=v1.zeros_initializer())
    return tf.matmul(x, w) + b


def _layer_norm(x, name):
    gain = v1.get_variable(f"{name}/gain", [DIM], initializer=v1.ones_initializer())
    bias = v1.get_variable(f"{name}/bias", [DIM], initializer=v1.zeros_initializer())
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + 1e-6) * gain + bias


def transformer_fn(num_blocks):
    """Tensors between layers are batch-major [batch, SEQ, DIM]; blocks work on rows inside."""

    def model_fn(features):
        with layer("embedding"):
            table = v1.get_variable("table", [VOCAB, DIM])
            h = tf.nn.embedding_lookup(table, features["tokens"])
        for i in range(num_blocks):
            with layer(f"block_{i}"):
                x = tf.reshape(h, [-1, DIM])
                qkv = tf.reshape(_dense(x, 3 * DIM, "qkv"), [-1, SEQ, 3, HEADS, DIM // HEADS])
                q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))
                scores = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / np.sqrt(DIM // HEADS))
                attended = tf.reshape(tf.transpose(tf.matmul(scores, v), [0, 2, 1, 3]), [-1, DIM])
                x = _layer_norm(x + _dense(attended, DIM, "out"), "ln_1")
                x = _layer_norm(
                    x + _dense(tf.nn.relu(_dense(x, 4 * DIM, "ffn_in")), DIM, "ffn_out"), "ln_2"
                )
                h = tf.reshape(x, [-1, SEQ, DIM])
        with layer("output"):
            logits = tf.matmul(tf.reshape(h, [-1, DIM]), table, transpose_b=True)
            return tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=tf.reshape(features["targets"], [-1]), logits=logits
                )
            )

    return model_fn


OPTIMIZERS = {
    "adam": lambda: v1.train.AdamOptimizer(1e-3),
    "sgd": lambda: v1.train.GradientDescentOptimizer(1e-3),
}
SPEC = {"tokens": ((SEQ,), tf.int32), "targets": ((SEQ,), tf.int32)}
DEVICE = "/job:localhost/replica:0/task:0/device:CPU:{}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZERS),
        help="one optimizer (default: SGD, then Adam; --grid: Adam)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="time every blocks x stages x micro-batches combination and print "
        "a markdown table with the graph size growth",
    )
    parser.add_argument("--grid-blocks", default="12,24,48")
    parser.add_argument("--grid-stages", default="2,4,8")
    parser.add_argument("--grid-micro-batches", default="4,16,32")
    args = parser.parse_args(argv)
    if args.grid:
        return grid(
            [int(x) for x in args.grid_blocks.split(",")],
            [int(x) for x in args.grid_stages.split(",")],
            [int(x) for x in args.grid_micro_batches.split(",")],
            args.optimizer or "adam",
        )
    for optimizer in [args.optimizer] if args.optimizer else ["sgd", "adam"]:
        report(args.blocks, args.stages, args.micro_batches, optimizer)
    print(
        f"machine calibration: creating one AddV2 op from Python costs {op_cost_us():.0f} us, "
        f"importing one costs {import_cost_us():.0f} us"
    )


def report(blocks: int, stages: int, micro_batches: int, optimizer: str) -> None:
    r = time_rewrite(blocks, stages, micro_batches, optimizer)
    print(
        f"transformer: {blocks} blocks ({r['layers']} layers, {r['template_ops']} "
        f"template ops) -> {stages} stages x {micro_batches} micro-batches, "
        f"{optimizer}: {r['training_ops']} ops in the training graph, "
        f"{r['differentiated']} of {stages} stages differentiated (the others repeat one), "
        f"{r['by_layers']} of them layer by layer"
    )
    print(f"  template build + analysis            {r['template_s']:7.2f} s")
    print(f"  rewrite (all passes)                 {r['rewrite_s']:7.2f} s  (target < 10 s)")
    for phase, seconds in r["phases"].items():
        print(f"    {phase:34s} {seconds:7.2f} s")
    own = r["rewrite_s"] - r["phases"]["optimizer apply_gradients"]
    print(f"  rewrite without the optimizer's own apply_gradients {own:5.2f} s")
    plain = time_single_device_build(blocks, optimizer)
    print("  for scale, plain TF building the single-device training graph of this model:")
    for phase, seconds in plain.items():
        print(f"    {phase:34s} {seconds:7.2f} s")


def time_rewrite(blocks: int, stages: int, micro_batches: int, optimizer: str = "adam") -> dict:
    t0 = time.perf_counter()
    template = build_template(transformer_fn(blocks), SPEC, seed=0)
    t1 = time.perf_counter()
    plan = even_plan(template.layers, [1] * stages, 2 * micro_batches, micro_batches, "1f1b")
    training = rewrite(template, plan, OPTIMIZERS[optimizer], device_name=DEVICE.format)
    t2 = time.perf_counter()
    return {
        "template_s": t1 - t0,
        "rewrite_s": t2 - t1,
        "phases": training.phase_seconds,
        "layers": len(template.layers),
        "differentiated": sum(
            g.gradient_twin is None for g in training.stage_graphs if g is not None
        ),
        "by_layers": sum(
            g.gradient_by_layers and g.gradient_twin is None
            for g in training.stage_graphs
            if g is not None
        ),
        "template_ops": len(template.graph.get_operations()),
        "training_ops": len(training.graph.get_operations()),
    }


def time_single_device_build(blocks: int, optimizer: str) -> dict:
    """model_fn, tf.gradients of the loss, the optimizer's apply_gradients, in a plain graph."""
    with tf.Graph().as_default():
        t0 = time.perf_counter()
        loss = transformer_fn(blocks)(
            {name: v1.placeholder(dtype, [None, *shape]) for name, (shape, dtype) in SPEC.items()}
        )
        t1 = time.perf_counter()
        variables = v1.trainable_variables()
        grads = tf.gradients(loss, variables)
        t2 = time.perf_counter()
        OPTIMIZERS[optimizer]().apply_gradients(zip(grads, variables))
        t3 = time.perf_counter()
    return {"model_fn": t1 - t0, "tf.gradients": t2 - t1, "optimizer apply": t3 - t2}


def op_cost_us(num_ops: int = 2000) -> float:
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [4])
        start = time.perf_counter()
        for _ in range(num_ops):
            x = tf.raw_ops.AddV2(x=x, y=x)
        return (time.perf_counter() - start) / num_ops * 1e6


def grid(blocks_list, stages_list, micro_batch_list, optimizer="adam") -> None:
    print(
        "| blocks | stages | micro-batches | template s | rewrite s | of which optimizer apply_gradients s | "
        "stages differentiated | template ops | training-graph ops |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for blocks in blocks_list:
        for stages in stages_list:
            for micro_batches in micro_batch_list:
                r = time_rewrite(blocks, stages, micro_batches, optimizer)
                print(
                    f"| {blocks} | {stages} | {micro_batches} | {r['template_s']:.2f} | "
                    f"{r['rewrite_s']:.2f} | "
                    f"{r['phases']['optimizer apply_gradients']:.2f} | "
                    f"{r['differentiated']} | {r['template_ops']} | {r['training_ops']} |",
                    flush=True,
                )
    print(
        f"\ncalibration: {op_cost_us():.0f} us per AddV2 created from Python, "
        f"{import_cost_us():.0f} us per imported op"
    )


def import_cost_us(num_ops: int = 5000) -> float:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.constant(1.0)
        for _ in range(num_ops):
            x = tf.identity(x)
    graph_def = graph.as_graph_def()
    with tf.Graph().as_default():
        start = time.perf_counter()
        tf.graph_util.import_graph_def(graph_def, name="calibration")
        return (time.perf_counter() - start) / (num_ops + 1) * 1e6


if __name__ == "__main__":
    main()
