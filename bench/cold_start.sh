#!/usr/bin/env bash
# Time a cold `make serve` as a new user meets it: a fresh clone of this repository's HEAD, empty
# pip and chorus caches, every output line stamped with the seconds since the start, until the
# server's /health answers 200 (then the server is stopped).
#
#   bench/cold_start.sh [--avx2] [WORK_DIR]      # WORK_DIR default /tmp/chorus-cold (emptied)
#
# --avx2 emulates a CPU without native bf16 on one that has it (ONEDNN_MAX_CPU_ISA=AVX2
# ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2; vLLM's own compiled kernels ignore them).
# CHORUS_* settings in the environment (CHORUS_PIVOT, CHORUS_ALM_STEPS, ...) pass through.
# Output: WORK_DIR/cold.log; its last line is "health 200 after N s" (or why it gave up).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "${1:-}" == --avx2 ]]; then
  export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
  shift
fi
work="${1:-/tmp/chorus-cold}"
rm -rf "$work" && mkdir -p "$work"
git clone -q "$repo" "$work/chorus"
export CHORUS_CACHE="$work/cache" PIP_CACHE_DIR="$work/pip" CHORUS_PORT="${CHORUS_PORT:-8123}"
log="$work/cold.log"
start=$(date +%s)
stamp() { while IFS= read -r line; do printf '%6d %s\n' $(( $(date +%s) - start )) "$line"; done; }
(cd "$work/chorus" && exec make serve) > >(stamp >> "$log") 2>&1 &
serve_pid=$!
result="gave up after 3600 s"
while (( $(date +%s) - start < 3600 )); do
  sleep 5
  if curl -sf -o /dev/null "http://127.0.0.1:$CHORUS_PORT/health"; then
    result="health 200 after $(( $(date +%s) - start )) s"; break
  fi
  if ! kill -0 "$serve_pid" 2>/dev/null; then result="make serve exited after $(( $(date +%s) - start )) s"; break; fi
done
pkill -f "$work/chorus/.venv" 2>/dev/null; sleep 5; pkill -9 -f "$work/chorus/.venv" 2>/dev/null
wait "$serve_pid" 2>/dev/null
sleep 1
echo "$result" | tee -a "$log"
