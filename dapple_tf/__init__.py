"""dapple-tf: hybrid pipeline + data parallel training for TensorFlow (tf.compat.v1 graph mode).

The public names are imported on first use, so that `import dapple_tf.<module>` of a module
that needs no TensorFlow (e.g. `dapple_tf.batching`, which train.py's flag checks use) does
not start TensorFlow before train.py has set its log level.
"""

import importlib
import os

# TensorFlow's oneDNN CPU kernels. On x86 CPUs without AVX-512 VNNI or AMX, TensorFlow leaves
# them off, and its Eigen MatMul then ran micro-batch rows 2-4x slower per row than whole
# batches (bench/README.md, "Micro-batching on one device"). TensorFlow reads this when it
# starts, so it applies where dapple_tf is imported before tensorflow; set it to 0 to opt out.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

_PUBLIC = {
    "Plan": "planner.plan_format",
    "PlanError": "planner.plan_format",
    "layer": "dapple_tf.layers",
    "SingleDeviceTrainer": "dapple_tf.trainer",
    "Trainer": "dapple_tf.trainer",
    "WeightedLoss": "graph_rewrite.template",
}

__all__ = ["Plan", "PlanError", "SingleDeviceTrainer", "Trainer", "WeightedLoss", "layer"]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dapple_tf' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
