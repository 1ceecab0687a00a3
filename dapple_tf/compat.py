"""Every private Horovod and TensorFlow call of the project, each with why it is needed and
the version it was checked against. Nothing else in the project imports a private name; when
either library is upgraded, this module is the list to re-check."""

from __future__ import annotations


def registered_process_sets() -> dict[int, list[int]]:
    """Process set id -> ranks, for every Horovod process set registered in this process.
    Checked against Horovod 0.28.1 (`horovod.tensorflow.mpi_ops._basics`). Why: a second
    Trainer with the same plan needs the sets the first one registered, and Horovod's public
    API can add a set (refused for ranks already registered) but not look one up."""
    from horovod.tensorflow.mpi_ops import _basics

    return dict(_basics._get_process_set_ids_and_ranks())


def process_set(set_id: int):
    """The `hvd.ProcessSet` object of a registered id. Checked against Horovod 0.28.1
    (`horovod.common.process_sets._temp_process_set_object`). Why: as for
    `registered_process_sets`; the object is what collectives take as `process_set=`."""
    from horovod.common.process_sets import _temp_process_set_object

    return _temp_process_set_object(set_id)


def op_def(op_type: str):
    """The OpDef of a registered TensorFlow op type, or None. Checked against TensorFlow 2.21
    (`tensorflow.python.framework.op_def_registry`). Why: a FunctionDef names node inputs by
    output argument, and only the OpDef says which outputs an op's arguments hold; no public
    API reads OpDefs."""
    from tensorflow.python.framework import op_def_registry

    return op_def_registry.get(op_type)


def onednn_enabled() -> bool:
    """Whether this TensorFlow process runs oneDNN's CPU kernels (TF_ENABLE_ONEDNN_OPTS as
    read at start-up, else TensorFlow's default for the CPU). Checked against TensorFlow 2.21
    (`tensorflow.python.util._pywrap_util_port.IsMklEnabled`). Why: the only way to ask; the
    transposed-weights pass pays only with these kernels."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())
