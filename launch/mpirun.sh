#!/usr/bin/env bash
# Run a dapple-tf script on several ranks with Open MPI's mpirun, one rank per GPU.
#
#   launch/mpirun.sh -np 16 -H host1:8,host2:8 train.py --model=bert --dapple_plan=auto ...
#
# Needs Horovod built with MPI (bash launch/install.sh --with-mpi installs Debian's OpenMPI and
# builds it so). Everything before the first *.py argument goes to mpirun; we add
# `-bind-to none -map-by slot --tag-output` and export the environment dapple-tf and Horovod
# need (-x), with the defaults of launch/horovod.sh. Rank r uses plan device id r; local rank k
# on a host uses GPU k (launch/README.md).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
command -v mpirun >/dev/null 2>&1 || { echo "launch/mpirun.sh: mpirun not found; install Open MPI (bash launch/install.sh --with-mpi) or use launch/horovod.sh" >&2; exit 2; }
"$PYTHON" -c 'import horovod.tensorflow as h, sys; sys.exit(0 if h.mpi_built() else 1)' 2>/dev/null || {
  echo "launch/mpirun.sh: Horovod in $PYTHON was built without MPI; rebuild with bash launch/install.sh --with-mpi, or use launch/horovod.sh" >&2; exit 2; }

launcher_args=()
while [ $# -gt 0 ] && [[ "$1" != *.py ]]; do launcher_args+=("$1"); shift; done
[ $# -gt 0 ] || { echo "usage: launch/mpirun.sh -np N -H host1:n1[,host2:n2] script.py [args]" >&2; exit 2; }

export HOROVOD_DYNAMIC_PROCESS_SETS="${HOROVOD_DYNAMIC_PROCESS_SETS:-1}"
export DAPPLE_PEER_TIMEOUT_S="${DAPPLE_PEER_TIMEOUT_S:-60}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
exec mpirun "${extra[@]}" -bind-to none -map-by slot --tag-output \
  -x PATH ${LD_LIBRARY_PATH:+-x LD_LIBRARY_PATH} -x PYTHONPATH -x PYTHONUNBUFFERED -x TF_CPP_MIN_LOG_LEVEL \
  -x HOROVOD_DYNAMIC_PROCESS_SETS -x DAPPLE_PEER_TIMEOUT_S \
  ${DAPPLE_HEARTBEAT_DIR:+-x DAPPLE_HEARTBEAT_DIR} \
  "${launcher_args[@]}" "$PYTHON" "$@"
