"""Train a DAPPLE model pipelined over the local devices (or every Horovod rank).

    python train.py --model=gnmt --dapple_plan=auto
    horovodrun -np 4 -H localhost:4 python train.py --model=bert --dapple_plan=2:2

The model's template graph is profiled on one device, the planner picks a hybrid pipeline /
data-parallel plan for the devices at hand (or the plan given by --dapple_plan), and training
logs loss and throughput, writes checkpoints and TensorBoard summaries to --model_dir, and
resumes from the last checkpoint there when restarted.
"""
from __future__ import annotations

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "gnmt", "vgg19 | amoebanet | bert | gnmt | xlnet")
flags.DEFINE_string("preset", "tiny", "model size preset (tiny for CPU demos and tests ... paper)")
flags.DEFINE_string("dapple_plan", "auto",
                    "'auto' (profile + plan), a plan JSON path, or DAPPLE notation like '2:2', "
                    "'3:1' or 'DP4' (layers split evenly)")
flags.DEFINE_integer("global_batch_size", None, "rows per step (default: the model's default)")
flags.DEFINE_integer("num_micro_batches", None,
                     "micro-batches per step (notation plans; auto plans choose their own)")
flags.DEFINE_enum("schedule", None, ["gpipe", "1f1b"],
                  "pipeline schedule (default: the planner's choice, 1f1b for notation plans)")
flags.DEFINE_integer("num_devices", None,
                     "single process: stage devices to use (default: all GPUs, else 4 logical "
                     "CPU devices)")
flags.DEFINE_string("cluster", None,
                    "host boundaries for auto planning, DAPPLE seps like '8,16' (default: one "
                    "host holding all devices)")
flags.DEFINE_integer("steps", 20, "train until this global step")
flags.DEFINE_string("data_dir", None, "real data (model-specific format); default synthetic")
flags.DEFINE_string("model_dir", None,
                    "checkpoints, plan.json, summaries, traces; a run resumes from here "
                    "(default: runs/<model>-<preset>)")
flags.DEFINE_enum("optimizer", "adam", ["adam", "momentum", "sgd"], "optimizer")
flags.DEFINE_float("learning_rate", 1e-3, "learning rate")
flags.DEFINE_float("clip_norm", None, "clip gradients by this global norm (whole model)")
flags.DEFINE_integer("save_every", 10, "write a checkpoint every N steps (and at the end)")
flags.DEFINE_integer("log_every", 1, "log a progress line every N steps")
flags.DEFINE_integer("trace_step", None,
                     "trace this step and save its RunMetadata as model_dir/trace_step_<N>.pb "
                     "(draw it with python -m dapple_tf.timeline --model_dir DIR)")
flags.DEFINE_integer("seed", 0, "seed for weights and synthetic data")
flags.DEFINE_string("layers", None,
                    "layer rule: a regular expression matched (re.fullmatch) against name-scope "
                    "paths, e.g. 'bert/embeddings|bert/encoder/layer_\\d+|bert/pooler|cls' "
                    "(default: top-level name scopes; see docs/tf1-models.md)")


def main(argv):
    del argv
    from dapple_tf import runner
    runner.run_training(runner.TrainingConfig.from_flags(FLAGS))


def entry_point():
    app.run(main)


if __name__ == "__main__":
    entry_point()
