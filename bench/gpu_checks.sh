#!/usr/bin/env bash
# What only a GPU can show, in one go (bench/RESULTS.md records what it printed, with the card):
#   1. the compiled Triton kernels against the float64 reference (tests/test_kernels_cuda.py);
#   2. bench/mil_kernel.py on CUDA: Triton vs the published formulation, torch, torch.compile,
#      the copy bandwidth, and a sweep of Triton tile shapes;
#   3. bench/train_throughput.py: joint-training patches/s, Triton vs torch loss backend;
#   4. bench/proxy_throughput.py: the proxy pipeline on the GPU, 20,000+ instances (coco-train
#      repeated), Lite0 S=256 (the shipped model) and HRNet-W48 S=320 (the paper's), torch engine
#      fp16 + channels_last + CUDA graph, per-stage times; fp16 mask quality on coco-val vs fp32;
#   5. with two GPUs or more: one GPU per rank under torchrun (each rank's engine on
#      LOCAL_RANK's GPU and memory on no other), then a 2-rank proxy run with --merge-shards.
# Usage (repo root, on the GPU machine):  bash bench/gpu_checks.sh [LOG_DIR]
# Data: $BOXCASEG_DATA/coco-train (steps 3-4 skip without it). TensorRT is not needed here.
# The whole script stays under 10 minutes: each step's limit is cut to what is left of
# DEADLINE seconds (default 570), and a step with under 20 s left is skipped.
set -u
LOG=${1:-gpu-logs}
DEADLINE=${DEADLINE:-570}
mkdir -p "$LOG"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped (the 10-minute budget is spent)"; return; fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "=== $name (limit ${secs} s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$LOG/$name.log"
  echo "=== $name: rc $rc, $((SECONDS - t0)) s"
}
nvidia-smi -L
$PY -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__, torch.cuda.get_device_name())"
TAIL=8 step cuda_tests 180 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
  tests/test_proxy_gpu_pipeline.py -k "cuda or kernels"
step mil_kernel 150 $PY bench/mil_kernel.py --device cuda --n 16 64 256 --json --graphs \
  --triton-blocks 4x128,8x128,32x64,64x64
if [ -f "${BOXCASEG_DATA:-../shared/data}/coco-train/instances.json" ]; then
  TAIL=6 step train_throughput 100 $PY bench/train_throughput.py --device cuda --iters 60 --skip 15 \
    --batch-size 64 --workers 12 --backends auto,torch --amp on --set model.backbone_weights=
  TAIL=8 step proxy_lite0_20k 80 $PY bench/proxy_throughput.py --model lite0 --engines torch --min-instances 20000 \
    --batch-size 64 --workers 10 --post-workers 4 --precision fp16 --channels-last --cuda-graph --device cuda
  TAIL=8 step proxy_hrnet48_20k 80 $PY bench/proxy_throughput.py --model hrnet_w48 --engines torch --min-instances 20000 \
    --batch-size 64 --workers 10 --post-workers 4 --precision fp16 --channels-last --cuda-graph --device cuda
  V=${BOXCASEG_DATA:-../shared/data}/coco-val
  if [ -f "$V/instances.json" ]; then   # "mIoU* minus fp32's" must be within 0.005
    TAIL=8 step proxy_fp16_quality 80 $PY bench/proxy_throughput.py --model lite0 --engines torch --data "$V" \
      --precision fp16 --channels-last --cuda-graph --quality --workers 8 --device cuda
  fi
else
  echo "no coco-train under BOXCASEG_DATA: training and proxy throughput skipped"
fi
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  cat > "$LOG/rank_device.py" <<'PYEOF'
import os
import numpy as np
import torch
from boxcaseg import weights
from boxcaseg.export.engines import load_engine
e = load_engine("torch", weights.pretrained_path())
e.predict(np.zeros((4, 3, e.infer_size, e.infer_size), np.uint8))
used = [i for i in range(torch.cuda.device_count()) if torch.cuda.memory_allocated(i) > 0]
local = int(os.environ["LOCAL_RANK"])
ok = e.device == torch.device("cuda", local) and used == [local]
print(f"rank {os.environ['RANK']}: engine on {e.device}, memory on GPUs {used}: {'OK' if ok else 'WRONG'}")
raise SystemExit(0 if ok else 1)
PYEOF
  TAIL=4 step rank_device 120 $PY -m torch.distributed.run --standalone --nproc-per-node 2 "$LOG/rank_device.py"
  if [ -f "${BOXCASEG_DATA:-../shared/data}/coco-val/instances.json" ]; then
    V=${BOXCASEG_DATA:-../shared/data}/coco-val
    TAIL=6 step proxy_2gpu 180 $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m boxcaseg proxy \
      --ann "$V/instances.json" --images "$V/images" -o "$LOG/proxy_2gpu.json" --engine torch --no-progress
  fi
else
  echo "one GPU: the 2-GPU device-per-rank check skipped"
fi
