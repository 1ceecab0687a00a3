"""dapple-tf: hybrid pipeline + data parallel training for TensorFlow (tf.compat.v1 graph mode)."""
from planner.plan_format import Plan, PlanError
