#!/usr/bin/env bash
# What only a GPU can show, in one go (bench/RESULTS.md records what it printed, with the card):
#   1. the compiled Triton kernels against the float64 reference (tests/test_kernels_cuda.py);
#   2. bench/mil_kernel.py on CUDA: Triton vs the published formulation, torch, torch.compile,
#      the copy bandwidth, and a sweep of Triton tile shapes;
#   3. bench/train_throughput.py: joint-training patches/s, Triton vs torch loss backend;
#   4. bench/proxy_throughput.py: the proxy pipeline with the torch engine on the GPU;
#   5. with two GPUs or more: one GPU per rank under torchrun (each rank's engine on
#      LOCAL_RANK's GPU and memory on no other), then a 2-rank proxy run with --merge-shards.
# Usage (repo root, on the GPU machine):  bash bench/gpu_checks.sh [LOG_DIR]
# Data: $BOXCASEG_DATA/coco-train (steps 3-4 skip without it). TensorRT is not needed here.
set -u
LOG=${1:-gpu-logs}
mkdir -p "$LOG"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$LOG/$name.log"
  echo "=== $name: rc $rc, $((SECONDS - t0)) s"
}
nvidia-smi -L
$PY -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__, torch.cuda.get_device_name())"
TAIL=8 step kernels_cuda 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py
step mil_kernel 240 $PY bench/mil_kernel.py --device cuda --n 16 64 256 --json --graphs \
  --triton-blocks 1x128,2x128,4x128,8x64,8x128,16x64,16x128,32x32,32x64,32x128,4x256,8x256,64x64
if [ -f "${BOXCASEG_DATA:-../shared/data}/coco-train/instances.json" ]; then
  TAIL=6 step train_throughput 150 $PY bench/train_throughput.py --device cuda --iters 60 --skip 15 \
    --batch-size 64 --workers 12 --backends auto,torch --amp on --set model.backbone_weights=
  TAIL=12 step proxy_throughput 100 $PY bench/proxy_throughput.py --engines published,torch,onnx,trt \
    --limit-images 120 --workers 8 --batch-size 64
else
  echo "no coco-train under BOXCASEG_DATA: training and proxy throughput skipped"
fi
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  cat > "$LOG/rank_device.py" <<'PYEOF'
import os
import torch
from boxcaseg import weights
from boxcaseg.export.engines import load_engine
e = load_engine("torch", weights.pretrained_path())
e.predict(torch.zeros(4, 3, e.infer_size, e.infer_size))
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
