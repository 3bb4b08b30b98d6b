#!/usr/bin/env bash
# Create .venv and install onetrick with its test dependencies; install Debian's
# Fashion-MNIST (dataset-fashion-mnist) where we can. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# Fashion-MNIST: tests that need it skip without it; never fail the setup over it.
FASHION=/usr/share/datasets/fashion-mnist
if [ -f "$FASHION/t10k-labels-idx1-ubyte.gz" ] || [ -f "$FASHION/t10k-labels-idx1-ubyte" ]; then
    :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
        || echo "setup: apt-get could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"
else
    echo "setup: Fashion-MNIST not installed (needs root and apt-get: apt-get install dataset-fashion-mnist); its tests will skip"
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch/torchvision are pinned to the releases this project is tested with; pip's
# ranges in pyproject.toml admit any later release for users elsewhere.
# ONETRICK_TORCH_INDEX=URL takes them from another index (e.g. torch's CPU-only wheels).
INDEX=()
if [ -n "${ONETRICK_TORCH_INDEX:-}" ]; then INDEX=(--index-url "$ONETRICK_TORCH_INDEX"); fi
.venv/bin/python -m pip install -q "${INDEX[@]}" "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, onetrick" 
