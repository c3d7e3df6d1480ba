#!/usr/bin/env bash
# The README's main job: build the default three-family ensemble if needed and serve it.
#   SmolLM2-135M (Llama) and Gemma-3 270M moved onto Qwen2's tokenizer by a short ALM run
#   (FVT initialisation + CHORUS_ALM_STEPS steps on the zoo's training text), plus
#   Qwen2.5-Coder-0.5B as it is (optional: left out when the zoo could not build it).
# Everything built is cached under $CHORUS_CACHE/default; a second run goes straight to serving.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CHORUS_VENV:-.venv}/bin"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# vLLM on CPU reserves a fraction of all RAM unless told the KV cache size (GiB).
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
CACHE="${CHORUS_CACHE:-$HOME/.cache/chorus}"
ZOO="$CACHE/zoo"
OUT="${CHORUS_DEFAULT_DIR:-$CACHE/default}"
STEPS="${CHORUS_ALM_STEPS:-40}"
mkdir -p "$OUT"

for member in smollm2 gemma3; do
  run="$OUT/$member-qwen2"
  if [[ -f "$run/model/config.json" ]]; then
    echo "[default] $member on the Qwen2 tokenizer: cached at $run/model"
    continue
  fi
  echo "[default] moving $member onto the Qwen2 tokenizer: FVT + $STEPS ALM steps"
  resume=()
  [[ -d "$run" ]] && resume=(--resume)   # an interrupted earlier run continues where it stopped
  "$BIN/transfer" run transfer/configs/default_member.yaml \
    "model.teacher=zoo:$member" "output.dir=$run" "train.steps=$STEPS" "train.warmup_steps=$((STEPS / 8))" "${resume[@]}"
done

members=(--member "smollm=$OUT/smollm2-qwen2/model" --member "gemma=$OUT/gemma3-qwen2/model")
if [[ -f "$ZOO/models/qwen2.5/.zoo-complete.json" ]]; then
  members+=(--member "qwen=$ZOO/models/qwen2.5")
fi
ensemble_dir="$OUT/ensemble"
if [[ ! -f "$ensemble_dir/chorus_ensemble.json" ]]; then
  "$BIN/ensemble" build "$ensemble_dir" "${members[@]}" --rule prob_mean \
    --tokenizer-from smollm --name chorus-default
fi

host="${CHORUS_HOST:-127.0.0.1}"
port="${CHORUS_PORT:-8000}"
url="http://$host:$port"
cat <<EOF
[default] serving $ensemble_dir on $url (engine ${CHORUS_ENGINE:-vllm}); ready when $url/health answers 200. Try:
  curl $url/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "chorus-default", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
  curl $url/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "chorus-default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32}'
EOF
exec "$BIN/serve" --ensemble "$ensemble_dir" --host "$host" --port "$port" --engine "${CHORUS_ENGINE:-vllm}"
