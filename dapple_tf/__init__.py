"""dapple-tf: hybrid pipeline + data parallel training for TensorFlow (tf.compat.v1 graph mode)."""
from planner.plan_format import Plan, PlanError
from dapple_tf.layers import layer
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import WeightedLoss
