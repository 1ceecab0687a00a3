#!/usr/bin/env bash
# One-command install of dapple-tf and its stack into ./.venv:
#   TensorFlow 2.21 (CPU build, or GPU build with --gpu / when nvidia-smi is found),
#   numpy, absl-py, pytest, matplotlib, ruff, the project (editable), and Horovod 0.28.1 built from its
#   source distribution with TensorFlow + Gloo (+ MPI when an MPI compiler is installed).
#
# Idempotent: re-running skips finished steps; the Horovod wheel is cached in .cache/ so a new
# virtual environment does not rebuild it.
#
# Usage: bash launch/install.sh [--gpu|--cpu] [--with-mpi] [--python PYTHON]
#   --with-mpi   apt-get install Debian's OpenMPI first when it is missing (needs root; otherwise
#                a warning and no MPI), then build Horovod with MPI so that `mpirun` works.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
CACHE="$REPO_ROOT/.cache"
TF_VERSION="2.21.0"
HOROVOD_VERSION="0.28.1"
PYTHON="${PYTHON:-python3.11}"
TF_FLAVOUR=""
WITH_MPI=0

while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) TF_FLAVOUR="gpu" ;;
    --cpu) TF_FLAVOUR="cpu" ;;
    --with-mpi) WITH_MPI=1 ;;
    --python) PYTHON="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

STEP="start"
LOG_DIR="$CACHE/logs"
mkdir -p "$LOG_DIR"
fail() {
  echo >&2
  echo "install.sh: FAILED at step: $STEP" >&2
  [ -n "${STEP_LOG:-}" ] && [ -f "$STEP_LOG" ] && {
    echo "---- last 40 lines of $STEP_LOG ----" >&2
    tail -n 40 "$STEP_LOG" >&2
    echo "---- full log: $STEP_LOG ----" >&2
  }
  exit 1
}
trap fail ERR

step() { STEP="$1"; STEP_LOG="$LOG_DIR/$2.log"; echo "==> $STEP"; }
quiet() { "$@" >"$STEP_LOG" 2>&1; }

if [ -z "$TF_FLAVOUR" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TF_FLAVOUR="gpu"; else TF_FLAVOUR="cpu"; fi
fi
if [ "$TF_FLAVOUR" = "gpu" ]; then TF_PACKAGE="tensorflow[and-cuda]==$TF_VERSION"; else TF_PACKAGE="tensorflow-cpu==$TF_VERSION"; fi

step "check Python ($PYTHON)" python
command -v "$PYTHON" >/dev/null 2>&1 || { echo "install.sh: '$PYTHON' not found; install Python 3.11 or pass --python" >&2; false; }
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' >"$STEP_LOG" 2>&1

if [ "$WITH_MPI" = 1 ] && ! command -v mpicxx >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "install OpenMPI (apt-get install openmpi-bin libopenmpi-dev)" apt-mpi
    quiet apt-get update
    DEBIAN_FRONTEND=noninteractive quiet apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev
  else
    echo "==> --with-mpi: cannot install OpenMPI here (needs root and apt-get); building Horovod" \
         "without MPI (horovodrun --gloo still works; install openmpi-bin libopenmpi-dev for mpirun)"
  fi
fi

step "create virtual environment $VENV" venv
[ -x "$VENV/bin/python" ] || quiet "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# Horovod's own build needs cloudpickle/psutil/pyyaml/packaging when built without isolation.
BASE_PACKAGES=("$TF_PACKAGE" numpy absl-py pytest pytest-timeout matplotlib ruff==0.17.6
               cloudpickle psutil pyyaml packaging wheel setuptools)
BASE_STAMP="$VENV/.dapple-base-$(echo "${BASE_PACKAGES[*]}" | cksum | cut -d' ' -f1)"
if [ -f "$BASE_STAMP" ]; then
  echo "==> $TF_PACKAGE, numpy, absl-py, pytest, matplotlib already installed"
else
  step "install $TF_PACKAGE, numpy, absl-py, pytest, matplotlib" pip-base
  quiet "${PIP[@]}" install "${BASE_PACKAGES[@]}"
  touch "$BASE_STAMP"
fi

horovod_ok() {
  "$VENV/bin/python" - "$HOROVOD_VERSION" <<'PY' >/dev/null 2>&1
import sys
import horovod, horovod.tensorflow as hvd
assert horovod.__version__ == sys.argv[1], horovod.__version__
assert hvd.gloo_built()
PY
}

MPI_TAG="nompi"
if command -v mpicxx >/dev/null 2>&1; then MPI_TAG="mpi"; fi
WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-tf$TF_VERSION-$TF_FLAVOUR-$MPI_TAG"

if horovod_ok && { [ "$MPI_TAG" = nompi ] || "$VENV/bin/python" -c 'import horovod.tensorflow as h; assert h.mpi_built()' 2>/dev/null; }; then
  echo "==> Horovod $HOROVOD_VERSION already installed"
  HOROVOD_CHECKED=1
else
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    step "download Horovod $HOROVOD_VERSION source distribution" hvd-download
    SRC_ROOT="$CACHE/horovod-src"
    rm -rf "$SRC_ROOT"; mkdir -p "$SRC_ROOT"
    quiet "${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$SRC_ROOT"
    tar -xzf "$SRC_ROOT/horovod-$HOROVOD_VERSION.tar.gz" -C "$SRC_ROOT"
    SRC="$SRC_ROOT/horovod-$HOROVOD_VERSION"

    step "patch Horovod for TensorFlow $TF_VERSION (drop xla_mpi_ops.cc)" hvd-patch
    CMAKELISTS="$SRC/horovod/tensorflow/CMakeLists.txt"
    grep -q 'xla_mpi_ops.cc' "$CMAKELISTS" >"$STEP_LOG" 2>&1
    sed -i '/xla_mpi_ops\.cc/d' "$CMAKELISTS"
    ! grep -q 'xla_mpi_ops.cc' "$CMAKELISTS"

    step "build Horovod $HOROVOD_VERSION wheel (TensorFlow + Gloo$([ "$MPI_TAG" = mpi ] && echo " + MPI"); about 2-4 minutes)" hvd-build
    TF_INCLUDE="$("$VENV/bin/python" -c 'import tensorflow as tf; print(tf.sysconfig.get_include())' 2>"$STEP_LOG")"
    for sub in external/highwayhash external/com_google_highway external/farmhash_archive/src; do
      [ -d "$TF_INCLUDE/$sub" ] || { echo "TensorFlow include dir $TF_INCLUDE/$sub is missing" >"$STEP_LOG"; false; }
    done
    export CXXFLAGS="${CXXFLAGS:-} -I$TF_INCLUDE/external/highwayhash -I$TF_INCLUDE/external/com_google_highway -I$TF_INCLUDE/external/farmhash_archive/src"
    export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
    if [ "$MPI_TAG" = mpi ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
    if [ "$TF_FLAVOUR" = gpu ] && command -v nvcc >/dev/null 2>&1; then export HOROVOD_GPU_OPERATIONS="${HOROVOD_GPU_OPERATIONS:-NCCL}"; fi
    export MAKEFLAGS="-j$(nproc)"
    mkdir -p "$WHEEL_DIR.tmp"
    (cd "$SRC" && "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEEL_DIR.tmp" . ) >"$STEP_LOG" 2>&1
    rm -rf "$WHEEL_DIR"; mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  fi
  step "install cached Horovod wheel from $WHEEL_DIR" hvd-install
  quiet "${PIP[@]}" install --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl
  quiet "${PIP[@]}" install cloudpickle psutil pyyaml packaging
fi

if "$VENV/bin/python" -c 'import dapple_tf, planner, sys; sys.exit(0 if dapple_tf.__file__.startswith(sys.argv[1]) else 1)' "$REPO_ROOT" 2>/dev/null \
    && [ -x "$VENV/bin/dapple-train" ]; then
  echo "==> dapple-tf already installed (editable)"
else
  step "install dapple-tf (editable)" project
  quiet "${PIP[@]}" install --no-build-isolation --no-deps -e "$REPO_ROOT"
fi

step "check: import horovod.tensorflow (Gloo built)" check-import
[ "${HOROVOD_CHECKED:-0}" = 1 ] || horovod_ok || { "$VENV/bin/python" -c 'import horovod.tensorflow' >"$STEP_LOG" 2>&1; false; }

step "check: horovodrun --check-build lists TensorFlow and Gloo" check-build
"$VENV/bin/horovodrun" --check-build >"$STEP_LOG" 2>&1
grep -E '^\s*\[X\] TensorFlow' "$STEP_LOG" >/dev/null
grep -E '^\s*\[X\] Gloo' "$STEP_LOG" >/dev/null

trap - ERR
TF_DIST="tensorflow-cpu"; [ "$TF_FLAVOUR" = gpu ] && TF_DIST="tensorflow"
echo "==> done: $("$VENV/bin/python" - "$TF_DIST" <<'PY'
import sys
from importlib.metadata import version
print(f"TensorFlow {version(sys.argv[1])}, Horovod {version('horovod')}")
PY
)"
sed -n '/Available Frameworks/,$p' "$LOG_DIR/check-build.log"
echo "Activate with: source .venv/bin/activate"
