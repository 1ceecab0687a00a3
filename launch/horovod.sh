#!/usr/bin/env bash
# Run a dapple-tf script on several ranks with horovodrun (Gloo), one rank per GPU.
#
#   launch/horovod.sh -np 16 -H host1:8,host2:8 train.py --model=bert --dapple_plan=auto ...
#   launch/horovod.sh -np 4 -H localhost:4 my_script.py
#
# Everything before the first *.py argument goes to horovodrun; the script and its arguments
# run under this repository's .venv Python (or $PYTHON). Rank r uses plan device id r; on each
# host, local rank k uses GPU k (see launch/README.md). Defaults set here (an existing value
# wins): HOROVOD_DYNAMIC_PROCESS_SETS=1 (dapple-tf adds process sets after reading the plan),
# HOROVOD_GLOO_TIMEOUT_SECONDS=300, DAPPLE_PEER_TIMEOUT_S=60 (a rank that waits this long for a
# hung or frozen rank exits with status 75, naming it). For multi-host jobs set
# DAPPLE_HEARTBEAT_DIR to a folder on a shared filesystem (e.g. inside --model_dir) so that
# every rank can see which rank is missing.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
HOROVODRUN="${HOROVODRUN:-$(dirname "$PYTHON")/horovodrun}"
[ -x "$HOROVODRUN" ] || HOROVODRUN="$(command -v horovodrun || true)"
[ -n "$HOROVODRUN" ] || { echo "launch/horovod.sh: horovodrun not found; run launch/install.sh" >&2; exit 2; }

launcher_args=()
while [ $# -gt 0 ] && [[ "$1" != *.py ]]; do launcher_args+=("$1"); shift; done
[ $# -gt 0 ] || { echo "usage: launch/horovod.sh -np N -H host1:n1[,host2:n2] script.py [args]" >&2; exit 2; }

export HOROVOD_DYNAMIC_PROCESS_SETS="${HOROVOD_DYNAMIC_PROCESS_SETS:-1}"
export HOROVOD_GLOO_TIMEOUT_SECONDS="${HOROVOD_GLOO_TIMEOUT_SECONDS:-300}"
export DAPPLE_PEER_TIMEOUT_S="${DAPPLE_PEER_TIMEOUT_S:-60}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$HOROVODRUN" --gloo "${launcher_args[@]}" "$PYTHON" "$@"
