#!/usr/bin/env bash
# What only a GPU can show, in one call of at most 10 minutes on a fresh lent machine, the most
# valuable figures first (bench/RESULTS.md records what it printed, with the card's name):
#   1. imports   every package the steps need, the card, the versions (one line of what is missing)
#   2. tests     a correctness subset: the compiled Triton kernels against the float64 reference,
#                graph capture, ties across tiles, no host sync; the proxy's CUDA paths
#   3. mil       bench/mil_kernel.py at N=64 with CUDA graphs (the kernel goals as ratios)
#   4. lite0     bench/proxy_throughput.py, 20,000+ instances, the shipped Lite0 S=256, torch engine
#                fp16 + channels_last + CUDA graph (the 2,000 instances/s goal)
#   5. train     bench/train_throughput.py: joint-training patches/s, Triton vs torch loss backend
#   6. hrnet     the same proxy benchmark with HRNet-W48 S=320 (the paper's network, random weights)
#   7. fp16      fp16 mask quality on coco-val against fp32 (mIoU* within 0.005)
#
# Usage (repository root):
#   bash bench/gpu_checks.sh [--dry-run] [LOG_DIR]      (LOG_DIR default gpu-logs; $OUT on the device)
#   bash bench/gpu_checks.sh --budget                   (print the step budget and check it)
# Prepare here, once: `python bench/gpu_data.py` (writes .gpu-data/: 60 coco-train images and
# coco-val, 24 MB) and the wheels of packages the device image lacks into .whl/ (pycocotools);
# then call the device tool with carry [".gpu-data", ".whl"] and this script. After bench/gpu_train.sh, on
# the same warm machine, its carry [".gpu-train", ".whl"] serves too (coco-train and coco-val are there).
# --dry-run runs every step here on the CPU, at toy sizes, with each GPU-only part replaced by
# "skipped: no GPU": a typo, a missing file or a missing package shows here, not there.
#
# Budget: each step has its own limit (seconds); their sum must stay under DEADLINE (default 540
# s, leaving room in a 600 s call for the wheel install), which --budget checks. A step stops at
# its limit; its output so far is kept. Every step appends its output to LOG_DIR/gpu_checks.log
# and one line to LOG_DIR/summary.txt as soon as it ends, so a cut-off loses only the step in flight.
set -u
DRY=0
if [ "${1:-}" = "--budget" ]; then BUDGET_ONLY=1; shift; else BUDGET_ONLY=0; fi
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
LOG=${1:-gpu-logs}
DEADLINE=${DEADLINE:-540}
STEPS=(imports:30 tests:100 mil:70 lite0:80 train:90 hrnet:70 fp16:60)
# shellcheck source=bench/gpu_steps.sh
source "$(dirname "$0")/gpu_steps.sh"   # limit_of, budget_check, install_wheels, step
budget_check || exit 1
[ "$BUDGET_ONLY" = 1 ] && exit 0

mkdir -p "$LOG"
FULL="$LOG/gpu_checks.log"; SUMMARY="$LOG/summary.txt"
: > "$FULL"; : > "$SUMMARY"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
install_wheels   # packages the device image lacks, carried as wheels in .whl/
if [ -d .gpu-data ]; then export BOXCASEG_DATA="${BOXCASEG_DATA:-$PWD/.gpu-data}"
elif [ -d .gpu-train ]; then export BOXCASEG_DATA="${BOXCASEG_DATA:-$PWD/.gpu-train}"; fi  # gpu_train.sh's carry
DATA=${BOXCASEG_DATA:-../shared/data}
TRAIN=$DATA/coco-train; VAL=$DATA/coco-val
echo "data: tests and mil: random tensors; lite0, hrnet: $TRAIN repeated to 20,000 instances;" \
     "train: $TRAIN boxes + synthetic salient pairs; fp16: $VAL" | tee -a "$SUMMARY"

# g GPU_ARGS CPU_ARGS: the GPU arguments, or in a dry run the CPU ones (the GPU ones named as skipped)
g() { if [ "$DRY" = 1 ]; then echo "  skipped: no GPU: $1" >&2; echo "$2"; else echo "$1"; fi; }
SUMMARY_PATTERN='^\(b|^\{"backend|passed|failed|Error|goals_n|copy_us|triton  |mIoU|MISSING|cuda:'

# 1. imports: one line of what is missing, then the card and the versions
step imports $PY - <<'PYEOF'
import importlib
need = ["torch", "torchvision", "triton", "numba", "timm", "pycocotools", "typer", "rich", "onnx",
        "onnxruntime", "PIL", "numpy", "scipy", "skimage", "pytest", "boxcaseg"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__})")
print("MISSING: " + (", ".join(missing) if missing else "none"))
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__,
      "cuda:", torch.cuda.get_device_name() if torch.cuda.is_available() else "skipped: no GPU")
PYEOF

# 2. correctness subset (fresh Triton cache: few shapes, the compiled kernels' paths)
KERNEL_TESTS=(
  "test_compiled_kernels_match_float64_reference[torch.float32-16x288x288]"
  "test_compiled_kernels_match_float64_reference[torch.bfloat16-16x288x288]"
  "test_compiled_kernels_match_float64_reference[torch.float64-3x1x2000]"
  test_forward_and_backward_do_not_sync test_compact_bags_reproducible_and_graph_captured
  test_ties_across_tiles_and_the_last_image_ticket test_auto_backend_is_triton_on_cuda_and_matches_torch)
if [ "$DRY" = 1 ]; then  # the module skips without a GPU: check that each named test exists
  for t in "${KERNEL_TESTS[@]}"; do
    grep -q "def ${t%%\[*}(" tests/test_kernels_cuda.py || echo "MISSING test: $t" | tee -a "$SUMMARY"
  done
  step tests $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_proxy_gpu_pipeline.py -k "cuda or fork_server"
else
  step tests $PY -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]/#/tests/test_kernels_cuda.py::}" \
    tests/test_proxy_gpu_pipeline.py -k "cuda or fork_server"
fi

# 3. the kernel against torch, torch.compile and the copy, eager and as CUDA graphs
step mil $PY bench/mil_kernel.py --json $(g "--device cuda --n 64 --graphs" "--device cpu --n 2 --rounds 1 --no-compile")

# 4. the shipped model's proxy pipeline at scale
step lite0 $PY bench/proxy_throughput.py --model lite0 --engines torch \
  $(g "--min-instances 20000 --batch-size 64 --workers 10 --post-workers 4 --precision fp16 --channels-last --cuda-graph --device cuda" \
      "--limit-images 4 --batch-size 8 --workers 1 --post-workers 0 --device cpu")

# 5. joint training
step train $PY bench/train_throughput.py --set model.backbone_weights= \
  $(g "--device cuda --iters 60 --skip 15 --batch-size 64 --workers 12 --backends auto,torch --amp on" \
      "--device cpu --iters 3 --skip 1 --batch-size 4 --workers 1 --backends auto --amp off --synthetic-salient 8")

# 6. the paper's network
step hrnet $PY bench/proxy_throughput.py --model hrnet_w48 --engines torch \
  $(g "--min-instances 20000 --batch-size 64 --workers 10 --post-workers 4 --precision fp16 --channels-last --cuda-graph --device cuda" \
      "--limit-images 1 --batch-size 4 --workers 0 --post-workers 0 --device cpu")

# 7. fp16 masks against fp32 on coco-val
step fp16 $PY bench/proxy_throughput.py --model lite0 --engines torch --data "$VAL" --quality \
  $(g "--precision fp16 --channels-last --cuda-graph --workers 8 --device cuda" \
      "--precision bf16 --limit-images 3 --workers 1 --post-workers 0 --device cpu")

echo "=== done in $SECONDS s (DEADLINE $DEADLINE s)" | tee -a "$SUMMARY"
