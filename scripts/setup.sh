#!/usr/bin/env bash
# Create .venv with torch (pinned; TORCH_SPEC overrides, e.g. TORCH_SPEC="torch" with your CUDA index)
# and the pack's requirements, plus accelerate (the `train` command) and the test tools (pytest, ruff,
# and comfy-cli, whose `comfy node validate` tests/test_packaging.py runs). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -c <(echo "$TORCH_SPEC") -r requirements.txt "accelerate>=0.26" pytest ruff "comfy-cli>=1.23"
