"""The stage-1 run's options checked as a whole, apart from the trainer, so the command line refuses a bad
run (a typo in a path, a missing flag) before PyTorch's training stack and diffusers are imported."""
from __future__ import annotations

import os

from ..errors import DreamPoseError
from ..files.paths import missing_flags
from ..files.weights import bundle_has_clip
from ..settings import TrainConfig, check_output_size


def check_config(config: TrainConfig) -> TrainConfig:
    """Every option checked before any weights are read; one DreamPoseError listing every problem."""
    c = config
    problems = c.problems()
    if not c.clip and not (c.init and os.path.isfile(c.init) and bundle_has_clip(c.init)):
        problems.append("--clip is required: the CLIP ViT-B/32 vision model (a folder or a .safetensors file)")
    if not c.base and not c.init:
        problems.append("give --base (Stable Diffusion 1.x, to start a fresh DreamPose) or --init (a DreamPose "
                        ".safetensors to continue from)")
    problems += missing_flags(clip=c.clip, base=c.base, vae=c.vae, init=c.init)
    if problems:
        raise DreamPoseError("train: " + "; ".join(problems))
    check_output_size(c.height, c.width)
    return c
