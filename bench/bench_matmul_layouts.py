"""TensorFlow's CPU MatMul on micro-batch rows: `x @ W` against `x @ W'^T` (W' = W transposed,
stored), per row count, with the kernels this process runs (oneDNN or Eigen).

    taskset -c 1 python bench/bench_matmul_layouts.py [--rows 512,256,128,64] [--steps 10]
    TF_ENABLE_ONEDNN_OPTS=0 taskset -c 1 python bench/bench_matmul_layouts.py   # Eigen

Why (graph_rewrite/transposed_weights.py): forward dense layers of a pipelined stage multiply
micro-batch rows by a weight; which layout the kernel runs at full speed decides whether the
rewriter hands forwards a transposed copy. Graph: 4 distinct 1024x1024 float32 variables times
the 512 rows of a variable split into row blocks, every product reduced to a scalar; one
session with one intra- and one inter-op thread; median of `--steps` runs after one warm-up.
Prints milliseconds per 512 rows and GFLOP/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dapple_tf  # noqa: E402,F401  (first: TensorFlow's oneDNN default, as users get it)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dapple_tf.compat import onednn_enabled  # noqa: E402

v1 = tf.compat.v1
WIDTH, ROWS, WEIGHTS = 1024, 512, 4


def median_seconds(session, fetches, steps):
    session.run(fetches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.run(fetches)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="512,256,128,64")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    v1.disable_eager_execution()
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) for _ in range(WEIGHTS)]
    config = v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
    print(
        f"oneDNN kernels: {onednn_enabled()}; {WEIGHTS} weights {WIDTH}x{WIDTH}, {ROWS} rows "
        f"in blocks; median of {args.steps}"
    )
    print("| rows per matmul | layout | ms per 512 rows | GFLOP/s |")
    print("|---|---|---|---|")
    flops = 2 * ROWS * WIDTH * WIDTH * WEIGHTS
    for rows in (int(r) for r in args.rows.split(",")):
        graph = tf.Graph()
        with graph.as_default():
            w = [v1.Variable(x) for x in weights]
            w_transposed = [v1.Variable(x.T.copy()) for x in weights]  # stored: no fold
            x = v1.Variable(rng.standard_normal((ROWS, WIDTH)).astype(np.float32))
            blocks = tf.split(x, ROWS // rows)
            layouts = {
                "x @ W": [tf.reduce_sum(tf.matmul(b, k)) for k in w for b in blocks],
                "x @ W'^T (transpose_b)": [
                    tf.reduce_sum(tf.matmul(b, k, transpose_b=True))
                    for k in w_transposed
                    for b in blocks
                ],
            }
            with v1.Session(graph=graph, config=config) as session:
                session.run(v1.global_variables_initializer())
                for name, fetches in layouts.items():
                    seconds = median_seconds(session, fetches, args.steps)
                    print(
                        f"| {rows} | {name} | {seconds * 1e3 / WEIGHTS:.1f} | "
                        f"{flops / seconds / 1e9:.0f} |"
                    )


if __name__ == "__main__":
    main()
