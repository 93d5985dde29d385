"""Frame sampling on diffusers schedulers: start latents, the denoising loop, decoding.

Frames are generated in chunks that share one UNet call per step (see ``guidance.py``). Each
chunk gets a fresh scheduler, so a multistep sampler's history never mixes chunks. Every random
draw comes from an explicit CPU ``torch.Generator``, so a seed gives the same video on any device.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       PNDMScheduler, UniPCMultistepScheduler)

from .conditioning import VAE_SCALE, ImageCondition, vae_latent
from .errors import DreamPoseError
from .guidance import DualCFGDenoiser
from .images import resize_u8, to_minus1_1
from .poses import LATENT_SCALE, PoseWindows
from .unet import LATENT_CHANNELS

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
SAMPLERS = ("pndm", "ddim", "dpmpp_2m", "euler_a", "unipc")
START_MODES = ("official", "noise")
STRETCH_MODES = ("none", "per_frame", "sequence")


def default_scheduler_config() -> dict:
    """SD 1.x's PNDM scheduler config, shipped so nothing is downloaded."""
    with open(os.path.join(CONFIG_DIR, "sd15_scheduler.json")) as f:
        return json.load(f)


def make_scheduler(sampler: str = "pndm", config: dict | None = None):
    """A fresh diffusers scheduler of the named kind on the SD 1.x noise schedule."""
    config = dict(config or default_scheduler_config())
    if sampler == "pndm":
        return PNDMScheduler.from_config(config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    raise DreamPoseError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


@dataclass
class SampleStats:
    """What the loop did, for benchmarks and tests."""

    unet_calls: int = 0
    frames: int = 0
    unet_batch: int = 0
    init_latents: torch.Tensor | None = None  # the x_T the run started from (to save and replay it)


def _randn(shape, generator, device):
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def start_latents(vae, cond: ImageCondition, scheduler, num_frames: int, height: int, width: int, *,
                  start: str, generator: torch.Generator | None, device) -> torch.Tensor:
    """x_T for every frame. ``official``: key frame latent noised to the first timestep; ``noise``:
    pure noise. Both share one noise tensor across frames (official quirk #12, kept on purpose: it
    is the method's main device for temporal consistency).

    Draw order from ``generator``: the key-frame latent sample (official only), then the noise.
    """
    shape = (1, LATENT_CHANNELS, height // LATENT_SCALE, width // LATENT_SCALE)
    if start == "official":
        key = to_minus1_1(resize_u8(cond.key_frame, height, width))
        key_latent = vae_latent(vae, key, "sample", generator).float().to(device)
        noise = _randn(shape, generator, device)
        x = scheduler.add_noise(key_latent, noise, scheduler.timesteps[:1].to(device))
    elif start == "noise":
        x = _randn(shape, generator, device) * scheduler.init_noise_sigma
    else:
        raise DreamPoseError(f"unknown start mode {start!r}; use one of {START_MODES}")
    return x.expand(num_frames, -1, -1, -1).clone()


def check_latents(latents: torch.Tensor, poses: PoseWindows) -> torch.Tensor:
    want = (LATENT_CHANNELS, poses.height // LATENT_SCALE, poses.width // LATENT_SCALE)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != want or latents.shape[0] not in (1, len(poses)):
        raise DreamPoseError(
            f"initial latents have shape {tuple(latents.shape)}; expected [1 or {len(poses)}, {want[0]}, "
            f"{want[1]}, {want[2]}] for {len(poses)} poses at {poses.width}×{poses.height}")
    return latents.float().expand(len(poses), -1, -1, -1)


@torch.no_grad()
def sample(unet, vae, cond: ImageCondition, poses: PoseWindows, *, steps: int = 100, sampler: str = "pndm",
           s_image: float = 8.0, s_pose: float = 3.0, generator: torch.Generator | None = None,
           start: str = "official", latents: torch.Tensor | None = None, frames_per_batch: int = 4,
           scheduler_config: dict | None = None,
           callback: Callable[[int, int, torch.Tensor], None] | None = None,
           stats: SampleStats | None = None) -> torch.Tensor:
    """Denoise every pose frame; returns latents ``[F,4,H/8,W/8]`` (float32, on the UNet's device).

    ``latents`` injects x_T (``[1|F,4,h,w]``) instead of computing it. ``callback(done, total,
    chunk_latents)`` runs after every step; raising from it cancels the run (ComfyUI's interrupt).
    """
    if steps < 1:
        raise DreamPoseError(f"steps must be at least 1, got {steps}")
    if frames_per_batch < 1:
        raise DreamPoseError(f"frames per UNet call must be at least 1, got {frames_per_batch}")
    if len(poses) == 0:
        raise DreamPoseError("no poses: give at least one DensePose frame")
    device = next(unet.parameters()).device
    scheduler = make_scheduler(sampler, scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    total = len(poses)
    if latents is None:
        x_all = start_latents(vae, cond, scheduler, total, poses.height, poses.width,
                              start=start, generator=generator, device=device)
    else:
        x_all = check_latents(latents, poses).to(device)
    if stats is not None:
        stats.init_latents = x_all
    cond_dev = cond.to(device)
    out = torch.empty_like(x_all)
    steps_total = len(scheduler.timesteps) * -(-total // frames_per_batch)
    done = 0
    for first in range(0, total, frames_per_batch):
        frames = slice(first, min(first + frames_per_batch, total))
        denoiser = DualCFGDenoiser(unet, cond_dev.cond, cond_dev.uncond, poses.windows(frames).to(device),
                                   s_image, s_pose)
        chunk_sched = make_scheduler(sampler, scheduler_config)
        chunk_sched.set_timesteps(steps, device=device)
        x = x_all[frames].clone()
        extra = {"generator": generator} if sampler == "euler_a" else {}
        for t in chunk_sched.timesteps:
            eps = denoiser(chunk_sched.scale_model_input(x, t), t)
            x = chunk_sched.step(eps, t, x, **extra).prev_sample
            done += 1
            if callback is not None:
                callback(done, steps_total, x)
        out[frames] = x
        if stats is not None:
            stats.unet_calls += denoiser.calls
            stats.unet_batch = max(stats.unet_batch, 3 * denoiser.frames)
    if stats is not None:
        stats.frames += total
    return out


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, batch_size: int = 4, stretch: str = "none",
                   callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Latents ``[F,4,h,w]`` → frames ``[F,H,W,3]`` float 0..1 on the CPU, decoded in batches.

    ``stretch``: ``per_frame`` is the official test.py min-max stretch (it flickers brightness);
    ``sequence`` stretches with one min/max for the whole clip; ``none`` (default) leaves pixels as decoded.
    """
    if stretch not in STRETCH_MODES:
        raise DreamPoseError(f"unknown stretch {stretch!r}; use one of {STRETCH_MODES}")
    param = next(vae.parameters())
    frames = []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i:i + batch_size].to(param.device, param.dtype) / VAE_SCALE
        img = (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
        frames.append(img.permute(0, 2, 3, 1).cpu())
        if callback is not None:
            callback(min(i + batch_size, latents.shape[0]), latents.shape[0])
    video = torch.cat(frames)
    if stretch == "per_frame":
        lo = video.amin(dim=(1, 2, 3), keepdim=True)
        hi = video.amax(dim=(1, 2, 3), keepdim=True)
        video = (video - lo) / (hi - lo).clamp_min(1e-8)
    elif stretch == "sequence":
        video = (video - video.min()) / (video.max() - video.min()).clamp_min(1e-8)
    return video
