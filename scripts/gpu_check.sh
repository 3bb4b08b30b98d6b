#!/usr/bin/env bash
# The GPU checks of issue #14, for a lent GPU machine (one H100 + 16 cores; under 8 minutes).
# Run from the source tree, no network, no pip:   scripts/gpu_check.sh OUT_DIR
# Writes into OUT_DIR: pytest-gpu.txt (the `gpu`-marked tests), bench-1gpu.{md,json} (AlexNet
# B=128 224px on one GPU: onetrick single vs the plain PyTorch loop, fp32 and bf16, and every
# strategy at world size 1), sim-this-device.{md,json} (blocks timed on the GPU), env.txt.
# ONETRICK_GPU_CHECK_DEVICE=cpu runs the same steps on the CPU with tiny sizes (to test the script).
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
device=${ONETRICK_GPU_CHECK_DEVICE:-cuda}
if [ "$device" = cuda ]; then
  model=alexnet; batch=128; steps=20; warmup=5; image=""; tests="-m gpu"
else
  model=smallnet; batch=8; steps=2; warmup=1; image=""; tests="-m gpu --co"   # collect only: no CUDA here
fi
status=0
{ date; nvidia-smi 2>&1 | head -15; $py -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } \
  > "$out/env.txt" 2>&1
# 1. the gpu tests (about 2 minutes; limits below add up to under 8 minutes)
# -o addopts: the GPU machine's pytest may lack pytest-xdist (pyproject's -n 2) and needs no parallelism
timeout 180 $py -m pytest -q -o addopts=-ra $tests tests/distributed/test_precision.py tests/distributed/test_step_sync.py -p no:cacheprovider \
  > "$out/pytest-gpu.txt" 2>&1 || status=1
tail -3 "$out/pytest-gpu.txt"
# 2. one-GPU bench rows: single vs the plain loop, fp32 and bf16; every strategy at world size 1
timeout 220 $py -m onetrick.cli bench --device "$device" --model $model $image --batch $batch --workers 1 \
  --strategies single,data,model,hybrid --sync ddp,sharded --scheme a,b --all-at-one --precision fp32,bf16 \
  --steps $steps --warmup $warmup --rounds 2 --out "$out/bench-1gpu" > "$out/bench-1gpu.log" 2>&1 || status=1
grep -E "Framework tax|^\| (single|torch loop)" "$out/bench-1gpu.md" 2>/dev/null
# 3. layer times on this device (a few seconds)
timeout 60 $py -m onetrick.cli simulate --profile this-device --device "$device" --model $model --batch $batch \
  --workers 1,8,64 --strategies single,data,hybrid --out "$out/sim-this-device" > "$out/sim.log" 2>&1 || status=1
head -8 "$out/sim-this-device.md" 2>/dev/null
exit $status
