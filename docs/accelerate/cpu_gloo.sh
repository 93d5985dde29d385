#!/usr/bin/env bash
# Two CPU processes on one machine, gloo backend: a test of the distributed path without a GPU.
# `accelerate launch --cpu --num_processes 2` starts only ONE process (accelerate runs several CPU
# processes through mpirun only), so use torchrun; accelerate reads its environment and picks gloo.
# Usage: bash docs/accelerate/cpu_gloo.sh --data DATA --base SD15 --clip CLIP --out runs/cpu-test [...]
set -euo pipefail
exec python -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" \
    -m dreampose train --cpu --threads "${THREADS:-1}" "$@"
