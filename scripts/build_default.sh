#!/usr/bin/env bash
# Build the default three-family ensemble (idempotent, resumable) and print its folder:
#   SmolLM2-135M (Llama) and Gemma-3 270M moved onto Qwen2's tokenizer by FVT and a short ALM
#   run (CHORUS_ALM_STEPS steps of transfer/configs/default_member.yaml on the zoo's training
#   text), plus Qwen2.5-Coder-0.5B as it is (left out when the zoo could not build it).
# Used by `make serve` (scripts/serve_default.sh) and by the images (`default-ensemble`).
# Settings: CHORUS_CACHE (zoo), CHORUS_DEFAULT_DIR (runs, default $CHORUS_CACHE/default),
# CHORUS_DEFAULT_ENSEMBLE (the folder, default $CHORUS_DEFAULT_DIR/ensemble), CHORUS_ALM_STEPS (40),
# CHORUS_DEFAULT_CONFIG (the run config), CHORUS_VENV (where the console scripts are; else PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ -n "${CHORUS_VENV:-}" ]]; then BIN="$CHORUS_VENV/bin/"
elif [[ -x "$here/../.venv/bin/transfer" ]]; then BIN="$here/../.venv/bin/"
else BIN=""; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CACHE="${CHORUS_CACHE:-$HOME/.cache/chorus}"
ZOO="$CACHE/zoo"
OUT="${CHORUS_DEFAULT_DIR:-$CACHE/default}"
ENSEMBLE="${CHORUS_DEFAULT_ENSEMBLE:-$OUT/ensemble}"
CONFIG="${CHORUS_DEFAULT_CONFIG:-$here/../transfer/configs/default_member.yaml}"
STEPS="${CHORUS_ALM_STEPS:-40}"
mkdir -p "$OUT"

for member in smollm2 gemma3; do
  run="$OUT/$member-qwen2"
  if [[ -f "$run/model/config.json" ]]; then
    echo "[default] $member on the Qwen2 tokenizer: cached at $run/model" >&2
    continue
  fi
  echo "[default] moving $member onto the Qwen2 tokenizer: FVT + $STEPS ALM steps" >&2
  resume=()
  [[ -f "$run/config.yaml" ]] && resume=(--resume)   # an interrupted earlier run continues where it stopped
  "${BIN}transfer" run "$CONFIG" "model.teacher=zoo:$member" "output.dir=$run" \
    "train.steps=$STEPS" "train.warmup_steps=$((STEPS / 8))" "${resume[@]}" >&2
  rm -rf "$run/checkpoints"   # the finished model is in $run/model; checkpoints are 2 GB each
done

members=(--member "smollm=$OUT/smollm2-qwen2/model" --member "gemma=$OUT/gemma3-qwen2/model")
if [[ -f "$ZOO/models/qwen2.5/config.json" ]]; then
  members+=(--member "qwen=$ZOO/models/qwen2.5")
fi
if [[ ! -f "$ENSEMBLE/chorus_ensemble.json" ]]; then
  "${BIN}ensemble" build "$ENSEMBLE" "${members[@]}" --rule prob_mean \
    --tokenizer-from smollm --name chorus-default >&2
fi
echo "$ENSEMBLE"
