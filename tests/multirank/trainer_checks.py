"""dapple_tf.Trainer under horovodrun (4 ranks): the unchanged single-process API.

trainer_checks.py equivalence <out_dir> <model>/<plan>/<schedule>[/grappler][/clip][/adam][/steps<n>][/resume<k>][,...]
    For every (model, plan, schedule): build Trainer (Grappler on with '/grappler', as in
    train.py; off otherwise, to keep graph building fast; clip_norm=CLIP_NORM with '/clip';
    Adam instead of the model's optimizer with '/adam'; allow_async for an asynchronous
    schedule), check get_weights() before training, run STEPS steps (n with '/steps<n>'), save
    a checkpoint; rank 0 writes <out_dir>/<tag>.npz (tag: <model>-<plan>-<schedule>[-clip]
    [-adam]) with the losses (as every rank saw them) and the final weights. With
    '/resume<k>': then a new trainer (other initial values: seed + 1) restores that checkpoint
    and trains k more steps on the batches that follow; the npz also holds its losses and
    final weights (resumed_losses, resumed/<name>). Plans: PLANS (even splits), SPLITS and
    INTERLEAVED. Models:
    those of rewrite_models.ALL, tf1bert0 / tf1bert1 (tests/tf1_bert.py with dropout 0 /
    0.1, its layer rule, Adam), and bn / bnfused (tests/batch_norm_model.py: moments batch
    norm, the last one fused).
trainer_checks.py sessions <out_dir>
    Record the ConfigProto of every TensorFlow session the process opens (whoever opens it)
    while it builds Trainer(plan="auto") for mlp on 2 ranks, trains a step, gathers the weights
    and saves; print one SESSIONS record per session: the dapple code that opened it and the
    config's visible_device_list (None: no config given).
trainer_checks.py kill <plan> <victim rank> <kill at step>
    Train mlp on <plan>/1f1b; in step <kill at step> the victim starts the step and a timer
    SIGKILLs it 50 ms later (mid-step), after printing "KILL victim rank <r> in step <s>".
trainer_checks.py resume <model_dir> <steps> <victim rank> <kill at step>
    Train mlp on plan 2x2/1f1b, resuming from <model_dir>/checkpoint.json when present, saving
    after every step; the victim SIGKILLs itself before <kill at step> (-1: never). Rank 0
    writes <model_dir>/final.npz at the end.
"""

import json
import os
import re
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import functools  # noqa: E402

import batch_norm_model  # noqa: E402
import rewrite_models as models  # noqa: E402
import tf1_bert  # noqa: E402
import dapple_tf  # noqa: E402
from graph_rewrite.template import build_template  # noqa: E402
from planner.plan_format import Plan, Stage, even_plan  # noqa: E402
from planner.schedules import ASYNC  # noqa: E402

GLOBAL_BATCH, MICRO_BATCHES, STEPS, SEED = 48, 4, 3, 7
CLIP_NORM = 0.05  # below the global gradient norm of every test model's first steps
PLANS = {"2x2": [2, 2], "4stages": [1, 1, 1, 1], "3:1": [3, 1], "1:1": [1, 1], "DP2": [2]}
# Plans with a chosen split: (layer count, replicas) per stage. skip0to2 puts the skip model's
# layers a | b c | d | loss on 4 ranks, so a's output travels from stage 0 to stage 2.
SPLITS = {"skip0to2": [(1, 1), (2, 1), (1, 1), (1, 1)]}
# Interleaved plans (schedule interleaved-1f1b): the device groups; the layers split evenly into
# 4 stages, stage s on group s mod P. il2x2: stages 0, 2 on ranks [0, 2], stages 1, 3 on [1, 3]
# (issue #15's example); il1x4: all 4 stages on ranks [0, 1, 2, 3] (the tied embedding's stages
# 0 and 3 on every rank).
INTERLEAVED = {"il2x2": [(0, 2), (1, 3)], "il1x4": [(0, 1, 2, 3)]}
INTERLEAVED_STAGES = 4


def optimizer():
    return tf.compat.v1.train.MomentumOptimizer(0.1, momentum=0.9)


def batches(case, steps):
    rng = np.random.default_rng(123)
    return [case.make_batch(rng, GLOBAL_BATCH) for _ in range(steps)]


def adam():
    return tf.compat.v1.train.AdamOptimizer(0.01)


TF1_BERT_DROPOUT = {"tf1bert0": 0.0, "tf1bert1": 0.1}


BATCH_NORM = {"bn": False, "bnfused": True}  # tests/batch_norm_model.py, fused or not


def model_case(model):
    """(case, layer rule, optimizer_fn) of a model name."""
    if model in BATCH_NORM:
        model_fn = batch_norm_model.model(fused=BATCH_NORM[model])
        return (
            models.ModelCase(model, model_fn, batch_norm_model.SPEC, batch_norm_model.make_batch),
            None,
            optimizer,
        )
    if model in TF1_BERT_DROPOUT:
        model_fn = functools.partial(tf1_bert.bert_classifier, dropout_rate=TF1_BERT_DROPOUT[model])
        return (
            models.ModelCase(model, model_fn, tf1_bert.FEATURE_SPEC, tf1_bert.make_batch),
            tf1_bert.LAYERS,
            adam,
        )
    return models.ALL[model], None, optimizer


def make_plan(layers, plan_name, schedule):
    if plan_name in INTERLEAVED:
        groups = INTERLEAVED[plan_name]
        split = even_plan(layers, [1] * INTERLEAVED_STAGES, GLOBAL_BATCH, MICRO_BATCHES)
        stages = [Stage(st.layers, groups[s % len(groups)]) for s, st in enumerate(split.stages)]
        return Plan(GLOBAL_BATCH, MICRO_BATCHES, schedule, tuple(stages))
    if plan_name in PLANS:
        return even_plan(layers, PLANS[plan_name], GLOBAL_BATCH, MICRO_BATCHES, schedule)
    stages, start, device = [], 0, 0
    for count, replicas in SPLITS[plan_name]:
        stages.append(
            Stage(tuple(layers[start : start + count]), tuple(range(device, device + replicas)))
        )
        start, device = start + count, device + replicas
    return Plan(GLOBAL_BATCH, MICRO_BATCHES, schedule, tuple(stages))


def make_trainer(
    case,
    plan_name,
    schedule,
    optimize_graph=False,
    clip_norm=None,
    layers=None,
    optimizer_fn=optimizer,
    seed=SEED,
):
    names = build_template(case.model_fn, case.feature_spec, layers=layers).layers
    plan = make_plan(names, plan_name, schedule)
    return dapple_tf.Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer_fn,
        plan,
        GLOBAL_BATCH,
        seed=seed,
        optimize_graph=optimize_graph,
        clip_norm=clip_norm,
        layers=layers,
        allow_async=schedule in ASYNC,
    )


def tag_of(model, plan_name, schedule, clip=False, adam_optimizer=False):
    options = ("-clip" if clip else "") + ("-adam" if adam_optimizer else "")
    return f"{model}-{plan_name}-{schedule}{options}".replace(":", "_")


def equivalence(out_dir, configs):
    for config in configs:
        model, plan_name, schedule, *options = config.split("/")
        case, layers, optimizer_fn = model_case(model)
        if "adam" in options:
            optimizer_fn = adam
        steps = next((int(o[len("steps") :]) for o in options if o.startswith("steps")), STEPS)
        resume = next((int(o[len("resume") :]) for o in options if o.startswith("resume")), 0)
        clip = "clip" in options

        def new_trainer(seed=SEED):
            return make_trainer(
                case,
                plan_name,
                schedule,
                optimize_graph="grappler" in options,
                clip_norm=CLIP_NORM if clip else None,
                layers=layers,
                optimizer_fn=optimizer_fn,
                seed=seed,
            )

        trainer = new_trainer()
        rank = trainer.rank
        transfer_ops = sorted(
            {
                op.type
                for op in trainer.graph.get_operations()
                if re.search(r"_to_s\d+/k\d+_j\d+/rank\d+_to_rank\d+/p\d+$", op.name)
            }
        )
        print(
            "TRANSPORT "
            + json.dumps(
                {
                    "tag": f"{model}-{plan_name}-{schedule}",
                    "rank": rank,
                    "kind": trainer.transport_kind,
                    "transfer_ops": ",".join(transfer_ops),
                }
            ),
            flush=True,
        )
        initial = trainer.get_weights()
        losses = [trainer.train_step(b) for b in batches(case, steps)]
        final = trainer.get_weights()
        tag = tag_of(model, plan_name, schedule, clip, "adam" in options)
        path = trainer.save(os.path.join(out_dir, f"ckpt-{tag}"))
        step = trainer.global_step
        trainer.close()
        resumed = {}
        if resume:
            trainer = new_trainer(SEED + 1)
            trainer.restore(path)
            resumed_losses = [trainer.train_step(b) for b in batches(case, steps + resume)[steps:]]
            resumed = {"resumed/" + k: v for k, v in trainer.get_weights().items()}
            resumed["resumed_losses"] = np.array(resumed_losses)
            trainer.close()
        print(
            "LOSSES "
            + json.dumps({"tag": tag, "rank": rank, "losses": losses, "global_step": step}),
            flush=True,
        )
        if rank == 0:
            np.savez(
                os.path.join(out_dir, tag + ".npz"),
                losses=np.array(losses),
                **{"initial/" + k: v for k, v in initial.items()},
                **{"final/" + k: v for k, v in final.items()},
                **resumed,
            )


def sessions(out_dir):
    import traceback
    from unittest import mock
    from tensorflow.python.client import session as session_lib  # to observe every session

    opened = []
    original_init = session_lib.BaseSession.__init__

    def recording_init(session, target="", graph=None, config=None):
        opened.append((_opener(traceback.extract_stack()), config))
        original_init(session, target, graph, config)

    with mock.patch.object(session_lib.BaseSession, "__init__", recording_init):
        case = models.MLP
        trainer = dapple_tf.Trainer(
            case.model_fn,
            case.feature_spec,
            optimizer,
            "auto",
            GLOBAL_BATCH,
            seed=SEED,
            num_devices=2,
            optimize_graph=False,
        )
        trainer.train_step(batches(case, 1)[0])
        trainer.get_weights()
        trainer.save(os.path.join(out_dir, "ckpt"))
        rank = trainer.rank
        trainer.close()
    for opener, config in opened:
        print(
            "SESSIONS "
            + json.dumps(
                {
                    "rank": rank,
                    "local_rank": int(os.environ["HOROVOD_LOCAL_RANK"]),
                    "opener": opener,
                    "visible_device_list": None
                    if config is None
                    else config.gpu_options.visible_device_list,
                }
            ),
            flush=True,
        )


def _opener(stack) -> str:
    """'<module>.<function>' of the innermost dapple_tf / graph_rewrite frame that is not the
    session helper itself."""
    for frame in reversed(stack):
        path = frame.filename.replace(os.sep, "/")
        for package in ("dapple_tf/", "graph_rewrite/"):
            if package in path and not path.endswith("dapple_tf/devices.py"):
                module = path[path.rindex(package) : -3].replace("/", ".")
                return f"{module}.{frame.name}"
    return "(other)"


def kill(plan_name, victim, kill_at):
    import threading

    case = models.MLP
    trainer = make_trainer(case, plan_name, "1f1b")
    for step, batch in enumerate(batches(case, kill_at + 2)):
        if trainer.rank == victim and step == kill_at:
            print(f"KILL victim rank {trainer.rank} in step {step}", flush=True)
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()
        trainer.train_step(batch)
        print(f"STEP rank {trainer.rank} step {step} done", flush=True)
    trainer.close()


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
    elif sys.argv[1] == "sessions":
        sessions(sys.argv[2])
    elif sys.argv[1] == "kill":
        kill(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        resume(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))


if __name__ == "__main__":
    main()
