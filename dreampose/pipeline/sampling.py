"""Frame sampling on diffusers schedulers: start latents, the denoising loop, decoding.

Frames are generated in chunks that share one UNet call per step (see ``guidance.py``). Each
chunk gets a fresh scheduler, so a multistep sampler's history never mixes chunks.
``generate_frames`` streams: it denoises a chunk, decodes it and hands it over before the next
chunk starts, so working memory stays flat however long the video (only the caller's output grows). Every random
draw comes from an explicit CPU ``torch.Generator``, so a seed gives the same video on any device.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       PNDMScheduler, UniPCMultistepScheduler)

from .conditioning import VAE_SCALE, ImageCondition, vae_latent
from ..errors import DreamPoseError
from .guidance import DualCFGDenoiser
from .images import resize_u8, to_minus1_1
from .poses import LATENT_SCALE, PoseWindows
from ..models.unet import LATENT_CHANNELS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
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


def _check_run(steps: int, frames_per_batch: int, poses: PoseWindows) -> None:
    if steps < 1:
        raise DreamPoseError(f"steps must be at least 1, got {steps}")
    if frames_per_batch < 1:
        raise DreamPoseError(f"frames per UNet call must be at least 1, got {frames_per_batch}")
    if len(poses) == 0:
        raise DreamPoseError("no poses: give at least one DensePose frame")


@torch.no_grad()
def denoise_chunks(unet, vae, cond: ImageCondition, poses: PoseWindows, *, steps: int = 100, sampler: str = "pndm",
                   s_image: float = 8.0, s_pose: float = 3.0, generator: torch.Generator | None = None,
                   start: str = "official", latents: torch.Tensor | None = None, frames_per_batch: int = 4,
                   scheduler_config: dict | None = None,
                   callback: Callable[[int, int, torch.Tensor], None] | None = None,
                   stats: SampleStats | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(frames, latents)`` per chunk of ``frames_per_batch`` frames as soon as it is denoised
    (float32 on the UNet's device). Arguments as :func:`sample`. x_T is kept as one shared latent
    (or the injected tensor), never as a per-frame copy, so memory does not grow with the frame count.
    """
    _check_run(steps, frames_per_batch, poses)
    device = next(unet.parameters()).device
    scheduler = make_scheduler(sampler, scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    total = len(poses)
    if latents is None:
        x_start = start_latents(vae, cond, scheduler, 1, poses.height, poses.width,
                                start=start, generator=generator, device=device)
    else:
        x_start = check_latents(latents, poses)[:latents.shape[0]].to(device)
    if stats is not None:
        stats.init_latents = x_start.expand(total, -1, -1, -1)
    cond_dev = cond.to(device)
    steps_total = len(scheduler.timesteps) * -(-total // frames_per_batch)
    done = 0
    for first in range(0, total, frames_per_batch):
        frames = slice(first, min(first + frames_per_batch, total))
        denoiser = DualCFGDenoiser(unet, cond_dev.cond, cond_dev.uncond, poses.windows(frames).to(device),
                                   s_image, s_pose)
        chunk_sched = make_scheduler(sampler, scheduler_config)
        chunk_sched.set_timesteps(steps, device=device)
        if x_start.shape[0] == 1:
            x = x_start.expand(frames.stop - frames.start, -1, -1, -1).clone()
        else:
            x = x_start[frames].clone()
        extra = {"generator": generator} if sampler == "euler_a" else {}
        for t in chunk_sched.timesteps:
            eps = denoiser(chunk_sched.scale_model_input(x, t), t)
            x = chunk_sched.step(eps, t, x, **extra).prev_sample
            done += 1
            if callback is not None:
                callback(done, steps_total, x)
        if stats is not None:
            stats.unet_calls += denoiser.calls
            stats.unet_batch = max(stats.unet_batch, 3 * denoiser.frames)
        del denoiser, chunk_sched
        yield frames, x
    if stats is not None:
        stats.frames += total


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
    out = None
    for frames, x in denoise_chunks(unet, vae, cond, poses, steps=steps, sampler=sampler, s_image=s_image,
                                    s_pose=s_pose, generator=generator, start=start, latents=latents,
                                    frames_per_batch=frames_per_batch, scheduler_config=scheduler_config,
                                    callback=callback, stats=stats):
        if out is None:
            out = x.new_empty((len(poses), *x.shape[1:]))
        out[frames] = x
    return out


def decode_batch(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[n,4,h,w]`` (SD-scaled) → frames ``[n,H,W,3]`` float 0..1, on the VAE's device."""
    param = next(vae.parameters())
    z = latents.to(param.device, param.dtype) / VAE_SCALE
    return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def generate_frames(unet, vae, cond: ImageCondition, poses: PoseWindows, *, steps: int = 100,
                    sampler: str = "pndm", s_image: float = 8.0, s_pose: float = 3.0,
                    generator: torch.Generator | None = None, start: str = "official",
                    latents: torch.Tensor | None = None, frames_per_batch: int = 4,
                    scheduler_config: dict | None = None,
                    callback: Callable[[int, int, torch.Tensor], None] | None = None,
                    stats: SampleStats | None = None
                    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Stream the video: per chunk, denoise, decode, and yield ``(frames, latents, images)`` —
    latents ``[n,4,h,w]`` float32 and images ``[n,H,W,3]`` 0..1 float32, both on the CPU — before the
    next chunk starts. The caller writes them into its output; nothing of the chunk is kept here, so
    memory stays flat with the sequence length. Same frames, bit for bit, as :func:`sample` then
    :func:`decode_latents` with ``batch_size=frames_per_batch`` (and no stretch: see
    :func:`stretch_frames`)."""
    for frames, x in denoise_chunks(unet, vae, cond, poses, steps=steps, sampler=sampler, s_image=s_image,
                                    s_pose=s_pose, generator=generator, start=start, latents=latents,
                                    frames_per_batch=frames_per_batch, scheduler_config=scheduler_config,
                                    callback=callback, stats=stats):
        images = decode_batch(vae, x).cpu()
        yield frames, x.cpu(), images
        del x, images


def stretch_frames(video: torch.Tensor, stretch: str) -> torch.Tensor:
    """The contrast stretch of :func:`decode_latents`, in place on ``video`` ``[F,H,W,3]`` (no copy of
    the clip) and returned."""
    if stretch not in STRETCH_MODES:
        raise DreamPoseError(f"unknown stretch {stretch!r}; use one of {STRETCH_MODES}")
    if stretch == "per_frame":
        for frame in video:
            lo, hi = frame.min(), frame.max()
            frame.sub_(lo).div_((hi - lo).clamp_min(1e-8))
    elif stretch == "sequence":
        lo, hi = video.min(), video.max()
        video.sub_(lo).div_((hi - lo).clamp_min(1e-8))
    return video


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, batch_size: int = 4, stretch: str = "none",
                   callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Latents ``[F,4,h,w]`` → frames ``[F,H,W,3]`` float 0..1 on the CPU, decoded in batches.

    ``stretch``: ``per_frame`` is the official test.py min-max stretch (it flickers brightness);
    ``sequence`` stretches with one min/max for the whole clip; ``none`` (default) leaves pixels as decoded.
    """
    if stretch not in STRETCH_MODES:
        raise DreamPoseError(f"unknown stretch {stretch!r}; use one of {STRETCH_MODES}")
    video = None
    for i in range(0, latents.shape[0], batch_size):
        img = decode_batch(vae, latents[i:i + batch_size]).cpu()
        if video is None:
            video = img.new_empty((latents.shape[0], *img.shape[1:]))
        video[i:i + img.shape[0]] = img
        if callback is not None:
            callback(min(i + batch_size, latents.shape[0]), latents.shape[0])
    return stretch_frames(video, stretch)
