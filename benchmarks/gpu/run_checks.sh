#!/usr/bin/env bash
# The GPU checks as one prepared command for the `device` tool (one NVIDIA H200 or H100, Python 3.12 and torch
# there, nothing else of nnU-Net's). Here, first: benchmarks/gpu/make_wheelhouse.sh (builds .whl/). Then:
#
#   run(command="bash benchmarks/gpu/run_checks.sh all", carry=[".whl"], timeout_s=600)
#
# STEP:
#   classification  benchmarks/classification_learning.py on CUDA with nnU-Net's default plans: stock and the
#                   default multitask trainer on the same data and schedule (EPOCHS x ITERATIONS, default 20 x 50)
#   speed           benchmarks/inference_speed.py --end-to-end on the default trainer's model from
#                   "classification" (run it first, on the same warm machine) and the benchmark's 12 test images
#                   (SPEED_INPUT=generated: the quiz test set's sizes instead, 72 generated cases or MAX_CASES)
#   all             both, in that order
# Every log and JSON goes to $OUT as it is written, so a command stopped at its limit still returns them.
# Environment: DEVICE (cuda; cpu only to check this script without a GPU), EPOCHS, ITERATIONS, VAL_ITERATIONS,
# TRAIN_SEED (unset: unseeded), NUM_PROC_DA (unset: the benchmark's default, 8 on CUDA, 1 with a seed), MAX_CASES (speed: the first N test images; default all
# 12), SPEED_INPUT (test or generated; default test), WORKDIR (/tmp/mtn_gpu), CLS_LIMIT and SPEED_LIMIT (seconds, default 420 and 150), SITE (/tmp/site).
set -uo pipefail
STEP=${1:-all}
OUT=${OUT:-/tmp/mtn_gpu_out}
SITE=${SITE:-/tmp/site}
DEVICE=${DEVICE:-cuda}
WORKDIR=${WORKDIR:-/tmp/mtn_gpu}
mkdir -p "$OUT" "$SITE" "$WORKDIR"
cd "$(dirname "$0")/../.."

if [ ! -f "$SITE/.installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && tar -C "$SITE" -xJf .whl/simpleitk-site.tar.xz && touch "$SITE/.installed" || { echo "install failed"; exit 1; }
fi
export PYTHONPATH="$SITE" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import platform, torch, nnunetv2, SimpleITK, multitask_nnunet
from importlib.metadata import version
print("python", platform.python_version(), "| torch", torch.__version__, "| nnunetv2", version("nnunetv2"),
      "| SimpleITK", SimpleITK.Version_VersionString(), "| multitask-nnunet", version("multitask-nnunet"))
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY

classification() {
    local seed=() workers=()
    [ -n "${TRAIN_SEED:-}" ] && seed=(--train-seed "$TRAIN_SEED")
    [ -n "${NUM_PROC_DA:-}" ] && workers=(--num-proc-da "$NUM_PROC_DA")
    timeout -s KILL "${CLS_LIMIT:-420}" python3 benchmarks/classification_learning.py --device "$DEVICE" \
        --workdir "$WORKDIR/cls" --trainers nnUNetTrainer_ClsBench MultitasknnUNetTrainer_ClsBench \
        --epochs "${EPOCHS:-20}" --iterations "${ITERATIONS:-50}" --val-iterations "${VAL_ITERATIONS:-10}" \
        "${workers[@]}" "${seed[@]}" --json "$OUT/classification.json" 2>&1 \
        | tee "$OUT/classification.log"
}

speed() {
    local model images
    model=$(ls -d "$WORKDIR"/cls/data_*/runs/*/nnUNet_results/*/MultitasknnUNetTrainer_ClsBench__* 2>/dev/null | head -1)
    images=$(ls -d "$WORKDIR"/cls/data_*/synthetic/test 2>/dev/null | head -1)
    if [ -z "$model" ] || [ -z "$images" ]; then echo "speed: run the classification step first"; return 1; fi
    # stock nnUNetv2_predict looks the model's trainer class up by name: the benchmark's trainers
    export nnUNet_extTrainer="$PWD/benchmarks/trainers${nnUNet_extTrainer:+:$nnUNet_extTrainer}"
    local cases=() input=(-i "$images")
    [ -n "${MAX_CASES:-}" ] && cases=(--max-cases "$MAX_CASES")
    [ "${SPEED_INPUT:-test}" = generated ] && input=(--data "$WORKDIR/speed_cases")
    timeout -s KILL "${SPEED_LIMIT:-150}" python3 benchmarks/inference_speed.py --end-to-end -m "$model" \
        "${input[@]}" --device "$DEVICE" "${cases[@]}" --json "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log"
}

case "$STEP" in
    classification) classification ;;
    speed) speed ;;
    all) classification; speed ;;
    *) echo "unknown step $STEP (classification, speed, all)"; exit 2 ;;
esac
