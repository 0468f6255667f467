#!/usr/bin/env bash
# Installs the project into .venv (idempotent), for this machine: the CPU path (torch, faiss-cpu) by default, the
# GPU path (a CUDA build of torch, faiss-gpu) where an NVIDIA GPU answers (`nvidia-smi -L` lists one). Never both
# FAISS builds: they install the same `faiss` module, so the other one is uninstalled first.
#   ./install.sh             chooses by nvidia-smi
#   ./install.sh --gpu       the GPU path whatever nvidia-smi says (e.g. building a GPU node's env on a login node)
#   ./install.sh --cpu       the CPU path, even on a GPU machine
#   ./install.sh --dry-run   prints the choice and the commands, runs nothing
set -euo pipefail
cd "$(dirname "$0")"
mode=auto dry=0
for arg in "$@"; do
  case $arg in
    --gpu) mode=gpu ;;
    --cpu) mode=cpu ;;
    --dry-run) dry=1 ;;
    -h | --help) sed -n '2,8p' "$0" | cut -c3-; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (--gpu, --cpu, --dry-run, --help)" >&2; exit 2 ;;
  esac
done
if [ "$mode" != auto ]; then
  why="asked for with --$mode"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  mode=cpu why="no nvidia-smi on PATH"
elif nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  mode=gpu why="nvidia-smi lists a GPU"
else
  mode=cpu why="nvidia-smi lists no GPU"
fi
echo "install.sh: the $mode path ($why)"

PY=.venv/bin/python
run() { if [ "$dry" = 1 ]; then echo "+ $*"; else "$@"; fi; }
has() { [ -x "$PY" ] && "$PY" -c "$1" 2>/dev/null; }     # a check on the venv as it is (none yet: false)
installed() { [ -x "$PY" ] && "$PY" -m pip show -q "$1" >/dev/null 2>&1; }
cuda_torch="import torch, sys; sys.exit(torch.version.cuda is None)"

run python3 -m venv .venv
run "$PY" -m pip install -q --upgrade pip
if [ "$mode" = cpu ]; then
  # torch first and pinned (torch==2.13.0 takes a CPU build where one lies on disk, as on CI), so that no resolver
  # pulls several GB of CUDA packages; a torch already in .venv (a CUDA one too) is kept
  has "import torch" || run "$PY" -m pip install -q "torch==2.13.0"
  if installed faiss-gpu; then run "$PY" -m pip uninstall -q -y faiss-gpu; fi
  extras=test
else
  # a CUDA build of torch: PyPI's Linux wheels of torch==2.13.0 are CUDA builds; a CPU build in .venv goes first
  if ! has "$cuda_torch"; then
    if has "import torch"; then run "$PY" -m pip uninstall -q -y torch; fi
    run "$PY" -m pip install -q "torch==2.13.0"
    if [ "$dry" = 0 ] && ! has "$cuda_torch"; then
      echo "install.sh: pip installed $("$PY" -c 'import torch; print(torch.__version__)'), a CPU build (a wheel on" \
        "disk or the index pins it). Install a CUDA build of torch into .venv (pytorch.org lists the commands)," \
        "then run ./install.sh --gpu again: a torch built for CUDA is kept" >&2
      exit 1
    fi
  fi
  if installed faiss-cpu; then run "$PY" -m pip uninstall -q -y faiss-cpu; fi
  extras=gpu,dev
fi
# PYTHONWARNINGS: setuptools warns on every editable install that a folder named like the package shadows it
# (that folder is the package itself, by design here)
run env PYTHONWARNINGS=ignore "$PY" -m pip install -q -e ".[$extras]"
