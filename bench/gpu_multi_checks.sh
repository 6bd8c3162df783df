#!/usr/bin/env bash
# With two GPUs or more (a machine bench/gpu_checks.sh does not need): one GPU per rank under
# torchrun (each rank's engine on LOCAL_RANK's GPU and memory on no other), then a 2-rank proxy
# run joined with --merge-shards. Usage (repository root): bash bench/gpu_multi_checks.sh [LOG_DIR]
set -u
LOG=${1:-gpu-logs}
mkdir -p "$LOG"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu-data ] && export BOXCASEG_DATA="${BOXCASEG_DATA:-$PWD/.gpu-data}"
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs} s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$LOG/$name.log"
  echo "=== $name: rc $rc, $((SECONDS - t0)) s"
}
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
