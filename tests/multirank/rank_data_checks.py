"""What each rank holds and is fed (4 ranks, plan 2x2, MLP, 1f1b, M = 2).

  rank_data_checks.py <out_dir> <single-device checkpoint>

Every rank builds the trainer, records the variables its graph holds, then:
  1. restores the single-device checkpoint and records get_weights() (the full dict);
  2. trains STEPS steps on batches it cuts itself to `trainer.local_rows` (as a per-rank input
     pipeline would: the global batch never reaches the trainer), recording the bytes fed;
  3. trains STEPS more steps on whole global batches, recording the bytes fed;
  4. trains STEPS more steps from its `input_fn` dataset (its own rows of each step), no feed;
  5. saves a checkpoint to <out_dir>/ckpt (each rank its own variables).
It prints 'RANKDATA {...}' with the variable names, local rows ([feature, lo, hi] ranges),
bytes fed and losses; rank 0
writes <out_dir>/weights.npz (restored and final weights).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import rewrite_models as models  # noqa: E402
import dapple_tf  # noqa: E402
from dapple_tf import checkpoint  # noqa: E402
from dapple_tf.trainer import take_rows  # noqa: E402
from graph_rewrite.template import build_template  # noqa: E402
from planner.plan_format import even_plan  # noqa: E402

GLOBAL_BATCH, MICRO_BATCHES, STEPS, SEED = 16, 2, 2, 7


def optimizer():
    return tf.compat.v1.train.AdamOptimizer(0.01)


def batches(steps, seed=321):
    rng = np.random.default_rng(seed)
    return [models.MLP.make_batch(rng, GLOBAL_BATCH) for _ in range(steps)]


def rank_dataset(local_rows):
    """input_fn: this rank's rows of each of the dataset phase's batches."""
    data = batches(STEPS, seed=777)
    return tf.data.Dataset.from_tensor_slices(
        {f: np.stack([take_rows(b[f], rows) for b in data]) for f, rows in local_rows.items()}
    )


def main():
    tf.compat.v1.disable_eager_execution()
    out_dir, reference_checkpoint = sys.argv[1], sys.argv[2]
    case = models.MLP
    layers = build_template(case.model_fn, case.feature_spec).layers
    plan = even_plan(layers, [2, 2], GLOBAL_BATCH, MICRO_BATCHES, "1f1b")
    trainer = dapple_tf.Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer,
        plan,
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
        input_fn=rank_dataset,
    )
    held = sorted(checkpoint.variables_by_name(trainer.graph))
    trainer.restore(reference_checkpoint)
    restored = trainer.get_weights()
    local_losses, local_bytes = [], []
    for batch in batches(STEPS):
        mine = {f: take_rows(batch[f], rows) for f, rows in trainer.local_rows.items()}
        local_losses.append(trainer.train_step(mine))
        local_bytes.append(trainer.fed_bytes)
    global_losses, global_bytes = [], []
    for batch in batches(STEPS, seed=654):
        global_losses.append(trainer.train_step(batch))
        global_bytes.append(trainer.fed_bytes)
    dataset_losses = [trainer.train_step() for _ in range(STEPS)]
    trainer.save(os.path.join(out_dir, "ckpt"))
    final = trainer.get_weights()
    record = {
        "rank": trainer.rank,
        "variables": held,
        "local_rows": [
            [f, lo, hi] for f, rows in sorted(trainer.local_rows.items()) for lo, hi in rows
        ],
        "local_bytes": local_bytes,
        "global_bytes": global_bytes,
        "losses": local_losses + global_losses + dataset_losses,
    }
    print("RANKDATA " + json.dumps(record), flush=True)
    if trainer.rank == 0:
        np.savez(
            os.path.join(out_dir, "weights.npz"),
            **{"restored/" + k: v for k, v in restored.items()},
            **{"final/" + k: v for k, v in final.items()},
        )
    trainer.close()


if __name__ == "__main__":
    main()
