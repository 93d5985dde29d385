#!/usr/bin/env bash
# Set up everything the tests need on a bare machine (venv, real ComfyUI host) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
COMFY_VENV="$PWD/.venv" bash tests/comfy_host/setup_host.sh >/dev/null
# ComfyUI's requirements may move shared packages; put ours back on top, torch pinned.
.venv/bin/python -m pip install -q -c <(echo "${TORCH_SPEC:-torch==2.13.0}") -r requirements.txt pytest ruff
exec .venv/bin/python -m pytest -q "$@"
