#!/usr/bin/env bash
# The GPU check of issue 17: every CUDA path of sere, run once, in at most 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # anywhere: tiny sizes on the CPU
#
# Python: $PYTHON if set, else .venv/bin/python, else python3; src/ goes first on PYTHONPATH, so
# the tree needs no `pip install -e .` when its dependencies are installed.
# Run from the repository root. Results go to OUT_DIR (default: $OUT, else gpu_check_out):
# logs/PART.log, status/PART (exit code), PART.json / PART.jsonl, summary.md, summary.json.
# Parts, each under its own time limit, each failure shown in the table without stopping the rest:
#   gpu_tests         pytest -m gpu (tests/test_gpu.py)
#   pretrain_auto     sere pretrain --config vit_small_ibot_sere data.dataset=synthetic, 50 steps,
#                     train.precision=auto (fp16 + gradient scaler on a GPU): images/s, peak memory
#   pretrain_compile  the same with train.compile=true
#   train_step        benchmarks/train_step.py, ViT-S/16 with the recipe's heads and crops, bf16,
#                     --max-batch: ours against the baseline path, MFU of ours
#   data_pipeline     benchmarks/data_pipeline.py, 14 DataLoader workers, photometric on the GPU
# The dry run keeps every part and every code path but CUDA's, at sizes a CPU runs in seconds.
set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/status"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/sere-gpu-check.XXXXXX")"  # checkpoints: kept out of OUT
trap 'rm -rf "$SCRATCH"' EXIT

# the interpreter: $PYTHON when set, else this tree's .venv, else python3
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY="$PWD/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this tree's sources, installed or not
PEAK_TFLOPS=989  # H200 SXM, bf16 dense

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; WORKERS=2
  T_TESTS=120; T_PRETRAIN=150; T_COMPILE=240; T_STEP=180; T_DATA=120
  MODEL=(model.embed_dim=32 model.depth=2 model.num_heads=2 model.patch_size=8 model.out_dim=64
         model.hidden_dim=32 model.bottleneck_dim=16 data.global_crop_size=32
         data.local_crop_size=16 data.local_crops_number=2 optim.batch_size=8
         data.synthetic_images=32 data.synthetic_size=64 train.device=cpu)
  STEPS=4; LOG_EVERY=2
  COMPILE_BACKEND=(--compile-backend eager)  # dynamo's tracing, no C++ code generation
  STEP_PRESET=demo  # small heads; --max-batch needs CUDA
  STEP_PRECISION=fp32  # bf16 is emulated (slow) on CPUs without native bf16
  STEP_ARGS=(--arch vit_tiny --patch 8 --global-size 32 --local-size 16 --local-crops 2
             --batch 2 --device cpu --warmup 1 --steps 1)
  DATA_ARGS=(--make-images 16 --global-size 64 --local-size 32 --local-crops 2 --batch 4
             --batches 6)
else
  DEVICE=cuda; WORKERS=14
  T_TESTS=60; T_PRETRAIN=80; T_COMPILE=120; T_STEP=170; T_DATA=45  # 475 s in all at most
  MODEL=(data.synthetic_images=2560 data.synthetic_size=256)  # the recipe's batch 128 per GPU
  STEPS=50; LOG_EVERY=10
  COMPILE_BACKEND=()
  STEP_PRESET=vit_small_ibot_sere
  STEP_PRECISION=bf16
  # batches 256, 512, 1024: at most 6 child processes
  STEP_ARGS=(--arch vit_small --patch 16 --global-size 224 --local-size 96 --local-crops 10
             --device cuda --warmup 2 --steps 3 --batch 256 --max-batch --batch-limit 1024)
  DATA_ARGS=(--make-images 256 --batch 64 --batches 84)  # 6 rounds of the 14 workers
fi

# run_part NAME SECONDS COMMAND...: the command's output to logs/NAME.log, its exit code (124 on
# timeout) to status/NAME; never stops the script
run_part() {
  local name="$1" seconds="$2"; shift 2
  local start=$SECONDS
  echo "[gpu_check] $name (at most ${seconds} s) ..."
  timeout -k 10 "$seconds" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  local code=$?
  echo "$code" >"$OUT_DIR/status/$name"
  echo "[gpu_check] $name: exit $code after $((SECONDS - start)) s"
}

{
  echo "date: $(date -u +%FT%TZ)"; echo "python: $PY"; echo "dry run: $DRY"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")' 2>&1
  nvidia-smi 2>&1 | head -20
  nproc
} >"$OUT_DIR/logs/machine.log" 2>&1

run_part gpu_tests "$T_TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py

pretrain() {  # pretrain NAME EXTRA_OVERRIDES...
  local name="$1"; shift
  run_part "$name" "$1" "$PY" benchmarks/gpu_check.py pretrain "${COMPILE_BACKEND[@]}" \
    "$OUT_DIR/$name.json" "$SCRATCH/$name" -- --config vit_small_ibot_sere data.dataset=synthetic \
    train.precision=auto "train.max_steps=$STEPS" "train.log_every=$LOG_EVERY" \
    "train.save_every=100000" "data.num_workers=$WORKERS" "train.output_dir=$SCRATCH/$name" \
    "${MODEL[@]}" "${@:2}"
}
pretrain pretrain_auto "$T_PRETRAIN"
pretrain pretrain_compile "$T_COMPILE" train.compile=true

run_part train_step "$T_STEP" bash -c '"$0" benchmarks/train_step.py --preset "$3" \
  --precision "$4" --paths baseline,ours --flops --peak-tflops "$1" --json "${@:5}" >"$2"' \
  "$PY" "$PEAK_TFLOPS" "$OUT_DIR/train_step.jsonl" "$STEP_PRESET" "$STEP_PRECISION" \
  "${STEP_ARGS[@]}"

run_part data_pipeline "$T_DATA" bash -c '"$0" benchmarks/data_pipeline.py --images "$1/jpegs" \
  --loader-workers "$2" --device "$3" --photometric-on device --json "${@:5}" >"$4"' \
  "$PY" "$SCRATCH" "$WORKERS" "$DEVICE" "$OUT_DIR/data_pipeline.jsonl" "${DATA_ARGS[@]}"

SUMMARY=(--peak-tflops "$PEAK_TFLOPS")
if [ "$DRY" = 1 ]; then SUMMARY+=(--dry-run); fi
"$PY" benchmarks/gpu_check.py summary "$OUT_DIR" "${SUMMARY[@]}"
