#!/usr/bin/env bash
# The README's main job: build the default three-family ensemble if needed
# (scripts/build_default.sh, cached under $CHORUS_CACHE/default) and serve it on localhost.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CHORUS_VENV:-.venv}/bin"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# vLLM on CPU reserves a fraction of all RAM unless told the KV cache size (GiB).
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
ensemble_dir="$(CHORUS_VENV="${CHORUS_VENV:-$PWD/.venv}" scripts/build_default.sh)"

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
