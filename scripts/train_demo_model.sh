#!/usr/bin/env bash
# The exact recipe of dreampose/assets/demo_dreampose.safetensors; packaging stores this file in its metadata.
# From nothing: the synthetic world -> a miniature "SD 1.x + CLIP" (autoencoder pretrained on world frames, random
# UNet and CLIP tower) -> stage 1 with `python -m dreampose train` -> one fp16 file with UNet, adapter, VAE and CLIP
# -> its VAE decoder pretrained once more on whole frames (the shipped file; see dreampose/demo/build.py).
# VARIANT=clip or VARIANT=onepose trains the paper's Table-2 ablations (CLIP-only, 1 pose) with the same budget.
# Widths: dreampose/demo/build.py (DEMO_UNET, DEMO_VAE), every GroupNorm with 32 groups, so the model also runs
# through ComfyUI's own UNet and VAE code (the nodes' native route), as real SD 1.x weights do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}   # idle OpenMP threads sleep: no spinning on shared cores
WORK=${WORK:-out/demo_model}
VARIANT=${VARIANT:-full}
case "$VARIANT" in
  full) EXTRA=() ;;
  clip) EXTRA=(--conditioning clip) ;;
  onepose) EXTRA=(--pose-window 1) ;;
  *) echo "VARIANT must be full, clip or onepose" >&2; exit 2 ;;
esac
"$PY" -m dreampose synth --out "$WORK/world" --split train --videos 96 --frames 12 --height 192 --width 128 --seed 0 --quiet
"$PY" -m dreampose synth --out "$WORK/world" --split test --videos 8 --frames 16 --height 192 --width 128 --seed 0 --quiet
# the autoencoder in two phases of 1000 steps (the second, from the first's VAE, brings the colours in)
[ -f "$WORK/base_phase1/base_info.json" ] || "$PY" -m dreampose.demo_model base --data "$WORK/world/train" \
  --out "$WORK/base_phase1" --vae-steps 1000 --seed 0
[ -f "$WORK/base/base_info.json" ] || "$PY" -m dreampose.demo_model base --data "$WORK/world/train" \
  --out "$WORK/base" --vae-steps 1000 --seed 1 --init-vae "$WORK/base_phase1/sd/vae"
"$PY" -m dreampose train --data "$WORK/world/train" --base "$WORK/base/sd" --clip "$WORK/base/clip" \
  --out "$WORK/train_$VARIANT" --height 192 --width 128 --steps 2000 --batch-size 16 --micro-batch 16 --lr 5e-4 \
  --seed 0 --cache-conditioning --workers 0 --include-vae --save-every 500 --resume latest --quiet "${EXTRA[@]}"
if [ "$VARIANT" = full ]; then
  "$PY" -m dreampose.demo_model package --trained "$WORK/train_full/dreampose.safetensors" --clip "$WORK/base/clip" \
    --out "$WORK/stage1_demo.safetensors" --command-file scripts/train_demo_model.sh
  # the decoder once more on whole frames, its border latents noised (encoder frozen): no band at the frames' edge
  "$PY" -m dreampose.demo_model decoder --bundle "$WORK/stage1_demo.safetensors" --data "$WORK/world/train" \
    --out dreampose/assets/demo_dreampose.safetensors --steps 300 --batch 8 --lr 2e-4 --border 2 --border-noise 1.5 \
    --seed 0 --command-file scripts/train_demo_model.sh
fi
