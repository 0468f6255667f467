#!/usr/bin/env bash
# Installs the project into .venv (idempotent). Torch first and pinned to a CPU build where one is on disk,
# so that no resolver pulls several GB of CUDA packages; on a GPU box install your CUDA torch first instead.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
# PYTHONWARNINGS: setuptools warns on every editable install that a folder named like the package shadows it
# (that folder is the package itself, by design here)
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[test]"
