#!/usr/bin/env bash
# The GPU checks as one prepared command for the `device` tool (one NVIDIA H200 or H100, Python 3.12 and torch
# there, nothing else of nnU-Net's). Here, first: benchmarks/gpu/make_wheelhouse.sh (builds .whl/). Then:
#
#   run(command="bash benchmarks/gpu/run_checks.sh all", carry=[".whl"], timeout_s=600)
#
# What fits (measured on one H200, 16 cores; TechReport 6.8): installing the wheelhouse ~20 s; data and nnU-Net's
# preprocessing of 60 hard cases ~1 min; each training of 16 x 50 iterations on nnU-Net's default plans ~1.8 min
# (stock 1.9 s, ours 2.8 s per epoch); stock's predictions of the 15 test and 36 training cases ~1.3 min; ours
# with its evaluation and equal-inference pass about as long. So 16 epochs with both trainers need ~7.5 min, and
# classification plus speed do not fit one 10-minute command: take EPOCHS=12 with MAX_CASES=6, or run speed
# alone on a model brought along (MODEL, in a carried folder). torch.compile costs 71 s in epoch 0 and 36 s
# more when the joint phase starts.
#
# STEP:
#   classification  benchmarks/classification_learning.py on CUDA with nnU-Net's default plans: stock and the
#                   default multitask trainer on the same data and schedule (EPOCHS x ITERATIONS, default 12 x 50)
#   speed           benchmarks/inference_speed.py --end-to-end on the default trainer's model from
#                   "classification" (run it first, on the same warm machine) and the benchmark's 12 test images
#                   (SPEED_INPUT=generated: the quiz test set's sizes instead, 72 generated cases or MAX_CASES)
#   compile         the default multitask trainer once more, 4 epochs x 5 iterations on the same data, with
#                   nnU-Net's torch.compile on (nnUNet_compile=t): whether the network, its head and both
#                   optimizers train compiled, and what the compilation costs
#   all             classification and speed; then compile if COMPILE_LIMIT seconds are left before DEADLINE
# Every log and JSON goes to $OUT as it is written, so a command stopped at its limit still returns them.
# Environment: MODEL (speed: a model folder instead of the classification step's), DEVICE (cuda; cpu only to
# check this script without a GPU), EPOCHS, ITERATIONS, VAL_ITERATIONS,
# CLS_ARGS (more arguments for classification_learning.py, e.g. "--difficulty hard --cases 36 --test-cases 15"),
# TRAIN_SEED (unset: unseeded), NUM_PROC_DA (unset: the benchmark's default, 8 on CUDA, 1 with a seed), MAX_CASES (speed: the first N test images; default all
# 12), SPEED_INPUT (test or generated; default test), WORKDIR (/tmp/mtn_gpu), CLS_LIMIT and SPEED_LIMIT (seconds, default 420 and 150), SITE (/tmp/site),
# nnUNet_compile (default f for classification and speed: compiling costs minutes of a short lease and the
# predictors never compile; the compile step measures it), DEADLINE (seconds from the start within which "all"
# ends, default 580), COMPILE_LIMIT (least seconds worth starting the compile step with, default 60).
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
export PYTHONPATH="$SITE" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 nnUNet_compile=${nnUNet_compile:-f}
python3 - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import os, platform, torch, nnunetv2, SimpleITK, multitask_nnunet
from importlib.metadata import version
print("python", platform.python_version(), "| torch", torch.__version__, "| nnunetv2", version("nnunetv2"),
      "| SimpleITK", SimpleITK.Version_VersionString(), "| multitask-nnunet", version("multitask-nnunet"))
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "| cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else "-", "| cpus", os.cpu_count())
PY

classification() {
    local seed=() workers=()
    [ -n "${TRAIN_SEED:-}" ] && seed=(--train-seed "$TRAIN_SEED")
    [ -n "${NUM_PROC_DA:-}" ] && workers=(--num-proc-da "$NUM_PROC_DA")
    timeout -s KILL "${CLS_LIMIT:-420}" python3 benchmarks/classification_learning.py --device "$DEVICE" \
        --workdir "$WORKDIR/cls" --trainers nnUNetTrainer_ClsBench MultitasknnUNetTrainer_ClsBench \
        --epochs "${EPOCHS:-12}" --iterations "${ITERATIONS:-50}" --val-iterations "${VAL_ITERATIONS:-10}" \
        "${workers[@]}" "${seed[@]}" ${CLS_ARGS:-} --json "$OUT/classification.json" 2>&1 \
        | tee "$OUT/classification.log"
}

speed() {
    local model images cases=() input=(--data "$WORKDIR/speed_cases")
    model=${MODEL:-$(ls -d "$WORKDIR"/cls/data_*/runs/*/nnUNet_results/*/MultitasknnUNetTrainer_ClsBench__* 2>/dev/null | head -1)}
    [ -n "$model" ] || { echo "speed: run the classification step first, or set MODEL"; return 1; }
    if [ "${SPEED_INPUT:-test}" != generated ]; then
        images=$(ls -d "$WORKDIR"/cls/data_*/synthetic/test 2>/dev/null | head -1)
        [ -n "$images" ] || { echo "speed: run the classification step first, or set SPEED_INPUT=generated"; return 1; }
        input=(-i "$images")
    fi
    # stock nnUNetv2_predict looks the model's trainer class up by name: the benchmark's trainers
    export nnUNet_extTrainer="$PWD/benchmarks/trainers${nnUNet_extTrainer:+:$nnUNet_extTrainer}"
    [ -n "${MAX_CASES:-}" ] && cases=(--max-cases "$MAX_CASES")
    timeout -s KILL "${SPEED_LIMIT:-150}" python3 benchmarks/inference_speed.py --end-to-end -m "$model" \
        "${input[@]}" --device "$DEVICE" "${cases[@]}" --json "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log"
}

compile_check() {
    local limit=${1:-150}
    nnUNet_compile=t timeout -s KILL "$limit" python3 benchmarks/classification_learning.py --device "$DEVICE" \
        --workdir "$WORKDIR/cls" --trainers MultitasknnUNetTrainer_ClsBench --epochs 4 --iterations 5 \
        --val-iterations 2 ${CLS_ARGS:-} 2>&1 | tee "$OUT/compile.log"
    grep -h -i -E "compile|epoch time|phase" "$WORKDIR"/cls/data_*/runs/*_e4_i5_v2/logs/*_train.log \
        >>"$OUT/compile.log" 2>/dev/null
}

case "$STEP" in
    classification) classification ;;
    speed) speed ;;
    compile) compile_check "${COMPILE_LIMIT:-150}" ;;
    all) classification; speed
         left=$(( ${DEADLINE:-580} - SECONDS ))
         if [ "$left" -ge "${COMPILE_LIMIT:-60}" ]; then compile_check "$left"
         else echo "compile step skipped: ${left} s left"; fi ;;
    *) echo "unknown step $STEP (classification, speed, compile, all)"; exit 2 ;;
esac
