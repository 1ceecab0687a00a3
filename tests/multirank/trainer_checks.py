"""dapple_tf.Trainer under horovodrun (4 ranks): the unchanged single-process API.

  trainer_checks.py equivalence <out_dir> <model>/<plan>/<schedule>[/grappler][,...]
      For every (model, plan, schedule): build Trainer (Grappler on with '/grappler', as in
      train.py; off otherwise, to keep graph building fast), check get_weights() before training, run
      STEPS steps, save a checkpoint; rank 0 writes <out_dir>/<model>-<plan>-<schedule>.npz with
      the losses (as every rank saw them) and the final weights. Plans: 2x2, 4stages, 3:1.
      Models: those of rewrite_models.ALL, and tf1bert0 / tf1bert1 (tests/tf1_bert.py with
      dropout 0 / 0.1, its layer rule, Adam).
  trainer_checks.py resume <model_dir> <steps> <victim rank> <kill at step>
      Train mlp on plan 2x2/1f1b, resuming from <model_dir>/checkpoint.json when present, saving
      after every step; the victim SIGKILLs itself before <kill at step> (-1: never). Rank 0
      writes <model_dir>/final.npz at the end.
"""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import functools  # noqa: E402

import rewrite_models as models  # noqa: E402
import tf1_bert  # noqa: E402
import dapple_tf  # noqa: E402
from graph_rewrite.template import build_template  # noqa: E402
from planner.plan_format import even_plan  # noqa: E402

GLOBAL_BATCH, MICRO_BATCHES, STEPS, SEED = 48, 4, 3, 7
PLANS = {"2x2": [2, 2], "4stages": [1, 1, 1, 1], "3:1": [3, 1]}


def optimizer():
    return tf.compat.v1.train.MomentumOptimizer(0.1, momentum=0.9)


def batches(case, steps):
    rng = np.random.default_rng(123)
    return [case.make_batch(rng, GLOBAL_BATCH) for _ in range(steps)]


def adam():
    return tf.compat.v1.train.AdamOptimizer(0.01)


TF1_BERT_DROPOUT = {"tf1bert0": 0.0, "tf1bert1": 0.1}


def model_case(model):
    """(case, layer rule, optimizer_fn) of a model name."""
    if model in TF1_BERT_DROPOUT:
        model_fn = functools.partial(tf1_bert.bert_classifier,
                                     dropout_rate=TF1_BERT_DROPOUT[model])
        return (models.ModelCase(model, model_fn, tf1_bert.FEATURE_SPEC, tf1_bert.make_batch),
                tf1_bert.LAYERS, adam)
    return models.ALL[model], None, optimizer


def make_trainer(case, plan_name, schedule, optimize_graph=False, layers=None,
                 optimizer_fn=optimizer):
    names = build_template(case.model_fn, case.feature_spec, layers=layers).layers
    plan = even_plan(names, PLANS[plan_name], GLOBAL_BATCH, MICRO_BATCHES, schedule)
    return dapple_tf.Trainer(case.model_fn, case.feature_spec, optimizer_fn, plan, GLOBAL_BATCH,
                             seed=SEED, optimize_graph=optimize_graph, layers=layers)


def equivalence(out_dir, configs):
    for config in configs:
        model, plan_name, schedule, *options = config.split("/")
        case, layers, optimizer_fn = model_case(model)
        trainer = make_trainer(case, plan_name, schedule, optimize_graph="grappler" in options,
                               layers=layers, optimizer_fn=optimizer_fn)
        rank = trainer.rank
        initial = trainer.get_weights()
        losses = [trainer.train_step(b) for b in batches(case, STEPS)]
        final = trainer.get_weights()
        tag = f"{model}-{plan_name}-{schedule}".replace(":", "_")
        trainer.save(os.path.join(out_dir, f"ckpt-{tag}"))
        step = trainer.global_step
        trainer.close()
        print("LOSSES " + json.dumps({"tag": tag, "rank": rank, "losses": losses,
                                      "global_step": step}), flush=True)
        if rank == 0:
            np.savez(os.path.join(out_dir, tag + ".npz"), losses=np.array(losses),
                     **{"initial/" + k: v for k, v in initial.items()},
                     **{"final/" + k: v for k, v in final.items()})


def resume(model_dir, steps, victim, kill_at):
    case = models.MLP
    trainer = make_trainer(case, "2x2", "1f1b")
    latest = os.path.join(model_dir, "checkpoint.json")
    start = 0
    if os.path.exists(latest):
        with open(latest) as f:
            name = json.load(f)["latest"]
        trainer.restore(os.path.join(model_dir, name))
        start = trainer.global_step
        print(f"RESUMED rank {trainer.rank} from {name} at step {start}", flush=True)
    data = batches(case, steps)
    for step in range(start, steps):
        if trainer.rank == victim and step == kill_at:
            print(f"KILL victim rank {trainer.rank} before step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        loss = trainer.train_step(data[step])
        done = trainer.global_step
        trainer.save(os.path.join(model_dir, f"ckpt-{done}"))
        if trainer.rank == 0:
            tmp = latest + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"latest": f"ckpt-{done}", "step": done}, f)
            os.replace(tmp, latest)
        print(f"STEP rank {trainer.rank} step {done} loss {loss:.6f}", flush=True)
    final = trainer.get_weights()
    if trainer.rank == 0:
        np.savez(os.path.join(model_dir, "final.npz"), **final)
    trainer.close()


def main():
    tf.compat.v1.disable_eager_execution()
    if sys.argv[1] == "equivalence":
        equivalence(sys.argv[2], sys.argv[3].split(","))
    else:
        resume(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))


if __name__ == "__main__":
    main()
