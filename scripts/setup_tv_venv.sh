#!/usr/bin/env bash
# A second venv with torchvision (not part of `make test`): torch 2.14.1 + torchvision 0.29.1 from this machine's
# local wheels (a 5.5 GB CUDA build that runs on the CPU), plus the project. Used by scripts/bench_torchvision.py to
# check the engine's torchvision branch (the fast Qwen image processor) and time it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-tv}
[[ -x "$VENV/bin/python" ]] || /usr/bin/python3 -m venv "$VENV"
grep -v '^torch==' constraints.txt > "$VENV/constraints.txt"
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/pip" install -q --disable-pip-version-check -c "$VENV/constraints.txt" -e . "torch==2.14.1"
"$VENV/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
