"""The shipped demo DreamPose and the unseen synthetic person it animates (``python -m dreampose demo``,
the demo nodes): no download, no input files.

The model (``dreampose/assets/demo_dreampose.safetensors``, fp16, UNet + adapter + VAE + CLIP in
one file) is the real DreamPose at a miniature size, trained with ``python -m dreampose train`` on
the synthetic world (:mod:`dreampose.demo.build` and ``scripts/train_demo_model.sh`` hold the recipe),
so it knows synthetic people only.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from ..data.world import neutral_pose, random_motion, random_outfit, render_video, world_seeds
from ..errors import DreamPoseError
from ..evaluation.sweep import Finetune, Scene
from ..loaders.load import load_dreampose
from ..settings import (DEMO_DECODER_BLEND, DEMO_DECODER_LOSS, DEMO_FINETUNE_LR, DEMO_FINETUNE_STEPS, DEMO_FRAMES,
                        DEMO_HEIGHT, DEMO_VAE_FINETUNE_STEPS, DEMO_WIDTH, MOTIONS, check_choice)
from .config import DEMO_FILE, DEMO_WORLD_SEED

# The demo's subject finetune on its key frame (the command, the side-by-side script and the benchmarks' rows).
DEMO_FINETUNE = Finetune(DEMO_FINETUNE_STEPS, DEMO_VAE_FINETUNE_STEPS, DEMO_FINETUNE_LR, DEMO_FINETUNE_LR,
                         decoder_loss=DEMO_DECODER_LOSS, decoder_blend=DEMO_DECODER_BLEND)


def load_demo_model(path: str = DEMO_FILE):
    """The shipped demo DreamPose (fp16 on disk; the caller places it on a device and dtype).

    Args:
        path: the demo file, by default ``dreampose/assets/demo_dreampose.safetensors`` (UNet, adapter, VAE and
            CLIP in one file).

    Returns:
        The :class:`~dreampose.models.bundle.DreamPoseModel`, as ``load_dreampose(dreampose=path)`` loads it.
    """
    if not os.path.isfile(path):
        raise DreamPoseError(f"the demo model is missing: {path!r}; reinstall the package or rebuild it with "
                             "scripts/train_demo_model.sh")
    return load_dreampose(dreampose=path)


# ------------------------------------------------------------------------------------------ demo scene

def demo_scene(frames: int = DEMO_FRAMES, subject: int = 0, motion: str | None = None, height: int = DEMO_HEIGHT,
               width: int = DEMO_WIDTH) -> dict:
    """An unseen subject and motion from the synthetic world's *test* split (never trained on).

    Args:
        frames: the motion's length ``F``.
        subject: which test subject (its index in the split); it also picks the default motion.
        motion: a motion family of ``dreampose.settings.MOTIONS`` (``walk``, ``sway``, …); default: the
            ``subject``-th of them, cycling.
        height, width: the frame size ``H``, ``W`` in pixels.

    Returns:
        A dict: ``key_frame`` (``[3,H,W]`` uint8: the subject standing in the neutral pose), ``key_uv`` (its UV
        ``[2,H,W]``), ``uv`` (the driving UV ``[F,2,H,W]``), ``truth`` (the ground-truth frames ``[F,3,H,W]``
        0..1: the subject rendered along the motion), ``subject`` (a description), ``motion`` (the family) and
        the exact part index of every pixel, ``parts`` ``[F,H,W]`` and ``key_parts`` ``[H,W]`` (for the drift
        metric).
    """
    if motion is not None:
        check_choice(motion, MOTIONS, "motion")
    outfit_seed, motion_seed = world_seeds(DEMO_WORLD_SEED, "test", subject)
    outfit = random_outfit(outfit_seed)
    kind = motion or MOTIONS[subject % len(MOTIONS)]
    truth = render_video(outfit, random_motion(motion_seed, frames, kind), height, width)
    key = render_video(outfit, neutral_pose()[None], height, width)
    return {"key_frame": (key.frames[0] * 255).round().to(torch.uint8), "key_uv": key.uv[0], "uv": truth.uv,
            "truth": truth.frames, "subject": f"test subject {subject} (outfit seed {outfit_seed})", "motion": kind,
            "parts": truth.parts, "key_parts": key.parts[0]}


def finetune_on_key_frame(model, key_u8: torch.Tensor, key_uv: torch.Tensor, *, steps: int = DEMO_FINETUNE_STEPS,
                          vae_steps: int = DEMO_VAE_FINETUNE_STEPS, lr: float = DEMO_FINETUNE_LR, seed: int = 0,
                          height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH, callback=None):
    """UNet + adapter, then VAE decoder, finetuned on the one key frame (paper §4.3); returns a new model.

    Args:
        model: the DreamPose model to start from (not changed).
        key_u8: the key frame ``[3,H,W]`` uint8.
        key_uv: its DensePose UV ``[2,H,W]``.
        steps: optimizer steps of the UNet + adapter finetune; 0 skips it.
        vae_steps: optimizer steps of the VAE decoder finetune; 0 skips it.
        lr, seed, height, width: for both finetunes; their other settings are :data:`DEMO_FINETUNE`'s (the
            defaults, ``FinetuneSettings()`` and :func:`~dreampose.settings.vae_settings`, but the decoder's
            loss and blend: L1, 0.6 of the change kept).
        callback: ``callback(stage, step, total, loss)`` after every optimizer step, ``stage`` ``"subject"``
            then ``"vae"``.

    Returns:
        The finetuned model (``model`` itself when both step counts are 0).
    """
    finetune = replace(DEMO_FINETUNE, steps=steps, vae_steps=vae_steps, lr=lr, vae_lr=lr)
    return finetune.on_key_frame(model, key_u8, key_uv, seed, height, width, callback)


def demo_test_scenes(count: int, frames: int = DEMO_FRAMES, height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH):
    """The first ``count`` test-split subjects, each with its own motion, as the benchmarks' scenes
    (:class:`~dreampose.evaluation.sweep.Scene`: key frame, its UV, the driving UV, the true frames)."""
    scenes = []
    for subject in range(count):
        s = demo_scene(frames, subject, None, height, width)
        scenes.append(Scene(f"test {subject} ({s['motion']})", s["key_frame"], s["key_uv"], s["uv"], s["truth"],
                            s["parts"], s["key_parts"]))
    return scenes

