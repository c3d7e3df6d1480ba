#!/usr/bin/env bash
# Build the default three-family ensemble (idempotent, resumable) and print its folder.
# Every member is moved onto one pivot tokenizer, CHORUS_PIVOT:
#   gemma3 (the default; ensemble/RESULTS.md): the strongest member's own tokenizer, so Gemma-3
#     stays exactly itself; SmolLM2 by FVT + CHORUS_ALM_STEPS ALM steps of
#     transfer/configs/default_member.yaml on the zoo's training text, Qwen2.5 by FVT +
#     CHORUS_QWEN_STEPS steps (0: FVT only); then `ensemble fit` (CHORUS_FIT=1, this pivot's
#     default) chooses the pooling rule, weights and temperatures on the zoo's dev texts; the
#     Gemma turn template. Folder: ensemble-gemma3.
#   qwen2 (the earlier recipe): SmolLM2-135M and Gemma-3 270M by FVT and CHORUS_ALM_STEPS ALM
#     steps; Qwen2.5-Coder-0.5B (left out when the zoo could not build it) as it is; prob_mean,
#     equal weights, ChatML. Folder: ensemble.
# Used by `make serve` (scripts/serve_default.sh) and by the images (`default-ensemble`).
# Settings: CHORUS_CACHE (zoo), CHORUS_DEFAULT_DIR (runs, default $CHORUS_CACHE/default),
# CHORUS_DEFAULT_ENSEMBLE (the folder, default $CHORUS_DEFAULT_DIR/ensemble-gemma3, or ensemble),
# CHORUS_ALM_STEPS (40 where training runs in bf16 natively, 30 where it falls back to fp32, so
# that a cold `make serve` stays within 30 minutes on 2 cores: README "Precision and hardware"),
# CHORUS_QWEN_STEPS (0), CHORUS_FIT, CHORUS_DEFAULT_CONFIG (the run config),
# CHORUS_VENV (where the console scripts are; else PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ -n "${CHORUS_VENV:-}" ]]; then BIN="$CHORUS_VENV/bin/"
elif [[ -x "$here/../.venv/bin/transfer" ]]; then BIN="$here/../.venv/bin/"
else BIN=""; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CACHE="${CHORUS_CACHE:-$HOME/.cache/chorus}"
ZOO="$CACHE/zoo"
OUT="${CHORUS_DEFAULT_DIR:-$CACHE/default}"
PIVOT="${CHORUS_PIVOT:-gemma3}"
CONFIG="${CHORUS_DEFAULT_CONFIG:-$here/../transfer/configs/default_member.yaml}"
case "$PIVOT" in   # the pivot's own model, whose tokenizer and chat template the ensemble uses, and fit
  gemma3) pivot_model=gemma3; template_from=gemma; fit="${CHORUS_FIT:-1}"; folder=ensemble-gemma3 ;;
  qwen2) pivot_model=qwen2.5; template_from=smollm; fit="${CHORUS_FIT:-0}"; folder=ensemble ;;
  *) echo "[default] CHORUS_PIVOT must be qwen2 or gemma3, got '$PIVOT'" >&2; exit 2 ;;
esac
ENSEMBLE="${CHORUS_DEFAULT_ENSEMBLE:-$OUT/$folder}"
mkdir -p "$OUT"

# member name in the ensemble, zoo model, ALM steps
# A step costs about 29 s in fp32 on 2 AVX2 cores, 15-22 s in native bf16 (ensemble/RESULTS.md).
default_steps() {
  "${BIN}python" -c "import torch; from transfer.precision import native_bf16
print(40 if native_bf16('cuda' if torch.cuda.is_available() else 'cpu') else 30)" 2>/dev/null || echo 30
}
alm_steps="${CHORUS_ALM_STEPS:-$(default_steps)}"
declare -A steps=([smollm2]="$alm_steps" [gemma3]="$alm_steps" [qwen2.5]="${CHORUS_QWEN_STEPS:-0}")
declare -A names=([smollm2]=smollm [gemma3]=gemma [qwen2.5]=qwen)
members=()
for model in gemma3 smollm2 qwen2.5; do
  if [[ ! -f "$ZOO/models/$model/config.json" ]]; then
    [[ "$model" == qwen2.5 ]] && continue   # optional in the zoo
    echo "[default] zoo model $model is missing: run make zoo" >&2; exit 2
  fi
  if [[ "$model" == "$pivot_model" ]]; then
    members+=(--member "${names[$model]}=$ZOO/models/$model")
    continue
  fi
  run="$OUT/$model-$PIVOT"
  n="${steps[$model]}"
  # The recipe a cached member was made with: a changed config or step count rebuilds it.
  recipe="steps=$n config=$(sha256sum "$CONFIG" | cut -c1-16)"
  [[ "$n" == 0 ]] && recipe="fvt"
  if [[ -d "$run" && "$(cat "$run.recipe" 2>/dev/null)" != "$recipe" ]]; then
    echo "[default] $model on the $PIVOT tokenizer: made by another recipe, rebuilding" >&2
    rm -rf "$run"
    stale=1
  fi
  echo "$recipe" > "$run.recipe"
  if [[ -f "$run/model/config.json" ]]; then
    echo "[default] $model on the $PIVOT tokenizer: cached at $run/model" >&2
  elif [[ "$n" == 0 ]]; then
    echo "[default] moving $model onto the $PIVOT tokenizer: FVT only" >&2
    rm -rf "$run/model"
    "${BIN}transfer" init --model "zoo:$model" --tokenizer "zoo:$PIVOT" --out "$run/model" >&2
  else
    echo "[default] moving $model onto the $PIVOT tokenizer: FVT + $n ALM steps" >&2
    resume=()
    [[ -f "$run/config.yaml" ]] && resume=(--resume)   # an interrupted earlier run continues where it stopped
    "${BIN}transfer" run "$CONFIG" "model.teacher=zoo:$model" "model.tokenizer=zoo:$PIVOT" "output.dir=$run" \
      "train.steps=$n" "train.warmup_steps=$(( (n + 7) / 8 ))" "${resume[@]}" >&2
    rm -rf "$run/checkpoints"   # the finished model is in $run/model; checkpoints are 2 GB each
  fi
  members+=(--member "${names[$model]}=$run/model")
done

if [[ -n "${stale:-}" || ! -f "$ENSEMBLE/chorus_ensemble.json" || ( "$fit" == 1 && ! -f "$ENSEMBLE/fit.json" ) ]]; then
  "${BIN}ensemble" build "$ENSEMBLE" "${members[@]}" --rule prob_mean --tokenizer-from "$template_from" \
    --chat-template-from "$template_from" --name chorus-default --overwrite >&2
  if [[ "$fit" == 1 ]]; then "${BIN}ensemble" fit "$ENSEMBLE" >&2; fi
fi
echo "$ENSEMBLE"
