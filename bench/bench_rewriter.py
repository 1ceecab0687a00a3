"""Time to rewrite a 48-layer transformer template into 8 stages x 16 micro-batches.

    python bench/bench_rewriter.py [--blocks 48] [--stages 8] [--micro-batches 16]
    python bench/bench_rewriter.py --grid [--grid-blocks 12,24,48] [--grid-stages 2,4,8]
                                          [--grid-micro-batches 4,16,32]

Prints the time of each phase: template build + analysis, partition + per-stage
differentiation, cloning with boundaries/schedule/accumulation/apply (the whole `rewrite`), and
the op count of the training graph. Target: template + rewrite under 10 s.
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
                x = _layer_norm(x + _dense(tf.nn.relu(_dense(x, 4 * DIM, "ffn_in")), DIM,
                                           "ffn_out"), "ln_2")
                h = tf.reshape(x, [-1, SEQ, DIM])
        with layer("output"):
            logits = tf.matmul(tf.reshape(h, [-1, DIM]), table, transpose_b=True)
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.reshape(features["targets"], [-1]), logits=logits))
    return model_fn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument("--grid", action="store_true",
                        help="time every blocks x stages x micro-batches combination and print "
                             "a markdown table with the graph size growth")
    parser.add_argument("--grid-blocks", default="12,24,48")
    parser.add_argument("--grid-stages", default="2,4,8")
    parser.add_argument("--grid-micro-batches", default="4,16,32")
    args = parser.parse_args(argv)
    if args.grid:
        return grid([int(x) for x in args.grid_blocks.split(",")],
                    [int(x) for x in args.grid_stages.split(",")],
                    [int(x) for x in args.grid_micro_batches.split(",")])
    spec = {"tokens": ((SEQ,), tf.int32), "targets": ((SEQ,), tf.int32)}

    t0 = time.perf_counter()
    template = build_template(transformer_fn(args.blocks), spec, seed=0)
    t1 = time.perf_counter()
    plan = even_plan(template.layers, [1] * args.stages, 2 * args.micro_batches,
                     args.micro_batches, "1f1b")
    t2 = time.perf_counter()
    training = rewrite(template, plan, lambda: v1.train.AdamOptimizer(1e-3),
                       device_name=lambda d: f"/job:localhost/replica:0/task:0/device:CPU:{d}")
    t3 = time.perf_counter()
    num_ops = len(training.graph.get_operations())
    print(f"transformer: {args.blocks} blocks ({len(template.layers)} layers, "
          f"{len(template.layer_of_op)} template ops) -> {args.stages} stages x "
          f"{args.micro_batches} micro-batches, {num_ops} ops in the training graph")
    print(f"  template build + analysis         {t1 - t0:7.2f} s")
    print(f"  rewrite (all passes)              {t3 - t2:7.2f} s")
    print(f"  template + rewrite                {t1 - t0 + t3 - t2:7.2f} s  (target < 10 s)")
    print(f"  machine calibration: importing a GraphDef costs {import_cost_us():.1f} us per op "
          f"now (TF's Python import_graph_def; the rewrite imports every op of every clone)")


def time_rewrite(blocks: int, stages: int, micro_batches: int) -> dict:
    spec = {"tokens": ((SEQ,), tf.int32), "targets": ((SEQ,), tf.int32)}
    t0 = time.perf_counter()
    template = build_template(transformer_fn(blocks), spec, seed=0)
    t1 = time.perf_counter()
    plan = even_plan(template.layers, [1] * stages, 2 * micro_batches, micro_batches, "1f1b")
    training = rewrite(template, plan, lambda: v1.train.AdamOptimizer(1e-3),
                       device_name=lambda d: f"/job:localhost/replica:0/task:0/device:CPU:{d}")
    t2 = time.perf_counter()
    return {"template_s": t1 - t0, "rewrite_s": t2 - t1,
            "template_ops": len(template.graph.get_operations()),
            "training_ops": len(training.graph.get_operations())}


def grid(blocks_list, stages_list, micro_batch_list) -> None:
    print("| blocks | stages | micro-batches | template s | rewrite s | template ops | "
          "training-graph ops | growth |")
    print("|---|---|---|---|---|---|---|---|")
    for blocks in blocks_list:
        for stages in stages_list:
            for micro_batches in micro_batch_list:
                r = time_rewrite(blocks, stages, micro_batches)
                print(f"| {blocks} | {stages} | {micro_batches} | {r['template_s']:.2f} | "
                      f"{r['rewrite_s']:.2f} | {r['template_ops']} | {r['training_ops']} | "
                      f"{r['training_ops'] / r['template_ops']:.1f}x |", flush=True)
    print(f"\nimport_graph_def calibration: {import_cost_us():.1f} us per op")


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
