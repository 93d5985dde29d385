"""Frame sampling on diffusers schedulers: start latents, the denoising loop, decoding.

Frames are denoised in chunks of ``options.frames_per_batch`` that share one UNet call per step
(``guidance.py``: the three guidance branches of every frame of the chunk in one batch). Each chunk
gets a fresh scheduler, so a multistep sampler's history never mixes chunks, and :func:`denoise`
yields each chunk as soon as it is done, so a caller that decodes and writes it before asking for
the next keeps working memory flat however long the video (:func:`dreampose.pipeline.animate.animate`
does). Every random draw comes from an explicit CPU ``torch.Generator``, so a seed gives the same
video on any device.

Every function takes the model, the condition, the pose windows and one
:class:`~dreampose.settings.SamplingOptions`; the output size is the pose windows' and must be the
options' too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       PNDMScheduler, UniPCMultistepScheduler)

from ..configs import default_scheduler_config
from ..errors import DreamPoseError
from ..models.devices import randn
from ..settings import LATENT_CHANNELS, LATENT_SCALE, VAE_SCALE, SamplingOptions, check_sampler, check_stretch
from ..models.attention import SharedAttention, shared_self_attention
from .conditioning import ImageCondition, check_condition_source, vae_latent
from .consistency import ConsistentDenoiser, anchor_frame, consistency_sources
from .guidance import DualCFGDenoiser
from .images import condition_frame, resize_u8, to_minus1_1
from .poses import PoseWindows

StepCallback = Callable[[int, int, torch.Tensor], None]


def make_scheduler(sampler: str = "pndm", config: dict | None = None):
    """A fresh diffusers scheduler of the named kind on the SD 1.x noise schedule."""
    config = dict(config or default_scheduler_config())
    check_sampler(sampler)
    if sampler == "pndm":
        return PNDMScheduler.from_config(config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    return UniPCMultistepScheduler.from_config(config)


@dataclass
class SampleStats:
    """What a run did, for summaries, benchmarks and tests (seconds are wall-clock, not synchronised)."""

    unet_calls: int = 0
    image_evaluations: int = 0                # UNet evaluations of one frame: 3 per guided step, 1 outside
    frames: int = 0
    unet_batch: int = 0
    init_latents: torch.Tensor | None = None  # the x_T the run started from (to save and replay it)
    encode_s: float = 0.0                     # encoding the subject and building the pose windows
    sample_s: float = 0.0                     # denoising
    decode_s: float = 0.0                     # decoding


def start_components(model, cond: ImageCondition, options: SamplingOptions, *,
                     generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What x_T is made of: the key frame's SD-scaled VAE latent sample at the output size (``official``
    start; None for ``noise``) and one standard normal noise ``[1,4,H/8,W/8]``, shared by all frames.

    Draw order from ``generator``: the key-frame latent sample (official only), then the noise.
    """
    device = device if device is not None else next(model.unet.parameters()).device
    shape = (1, LATENT_CHANNELS, options.height // LATENT_SCALE, options.width // LATENT_SCALE)
    key_latent = None
    if options.start == "official":
        key_latent = key_frame_latent(model.vae, cond.key_frame, options.height, options.width,
                                      generator).to(device)
    return key_latent, randn(shape, generator, device)


def key_frame_latent(vae, image: torch.Tensor, height: int, width: int,
                     generator: torch.Generator | None = None, latent_mode: str = "sample") -> torch.Tensor:
    """The official start's latent: the key frame as the condition sees it (:func:`condition_frame`;
    a condition's own ``key_frame`` already is), resized to the output size, a VAE posterior sample
    (SD-scaled, float32, ``[1,4,height/8,width/8]``) drawn from ``generator`` (``latent_mode`` "mode": the
    posterior mean, no draw)."""
    key = to_minus1_1(resize_u8(condition_frame(image), height, width))
    return vae_latent(vae, key, latent_mode, generator).float()


def reference_latent(vae, cond: ImageCondition, options: SamplingOptions,
                     key_latent: torch.Tensor | None) -> torch.Tensor:
    """The subject photo's clean latent at the output size: the official start's key-frame latent when the run
    has one (so the reference at the first step is x_T itself), else the posterior mean (no draw)."""
    if key_latent is not None:
        return key_latent
    return key_frame_latent(vae, cond.key_frame, options.height, options.width, latent_mode="mode")


def start_latents(model, cond: ImageCondition, scheduler, options: SamplingOptions, num_frames: int = 1, *,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """x_T for ``num_frames`` frames at the options' size. ``official``: the key frame latent noised to
    the first timestep (docs/official-code.md, quirk #14); ``noise``: pure noise. Both share one noise
    tensor across frames (quirk #12, kept on purpose: it is the method's main device for temporal
    consistency). Draws as :func:`start_components`.
    """
    device = device if device is not None else next(model.unet.parameters()).device
    key_latent, noise = start_components(model, cond, options, generator=generator, device=device)
    return compose_start(scheduler, key_latent, noise).expand(num_frames, -1, -1, -1).clone()


def compose_start(scheduler, key_latent: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
    """x_T from :func:`start_components` for a scheduler with its timesteps set: the key latent noised
    to the first timestep, or (``key_latent`` None) the noise at the scheduler's initial scale."""
    if key_latent is not None:
        return scheduler.add_noise(key_latent, noise, scheduler.timesteps[:1].to(noise.device))
    return noise * scheduler.init_noise_sigma


def check_latents(latents: torch.Tensor, poses: PoseWindows) -> torch.Tensor:
    """Injected x_T: ``[1|F,4,h,w]`` at the poses' latent size, expanded to every frame."""
    want = (LATENT_CHANNELS, poses.height // LATENT_SCALE, poses.width // LATENT_SCALE)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != want or latents.shape[0] not in (1, len(poses)):
        raise DreamPoseError(
            f"initial latents have shape {tuple(latents.shape)}; expected [1 or {len(poses)}, {want[0]}, "
            f"{want[1]}, {want[2]}] for {len(poses)} poses at {poses.width}×{poses.height}")
    return latents.float().expand(len(poses), -1, -1, -1)


def check_run(poses: PoseWindows, options: SamplingOptions) -> SamplingOptions:
    """The options are valid and describe the poses' output size."""
    options.check()
    if len(poses) == 0:
        raise DreamPoseError("no poses: give at least one DensePose frame")
    if (poses.height, poses.width) != (options.height, options.width):
        raise DreamPoseError(f"the pose windows are {poses.width}×{poses.height} (W×H) but the sampling options say "
                             f"{options.width}×{options.height}: build the windows at the output size")
    return options


@torch.no_grad()
def denoise(model, cond: ImageCondition, poses: PoseWindows, options: SamplingOptions, *,
            generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
            callback: StepCallback | None = None, stats: SampleStats | None = None
            ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Denoise the pose frames chunk by chunk, with dual classifier-free guidance.

    Args:
        model: the DreamPose model; its UNet (and, for the ``official`` start, its VAE) run where
            they are, in their dtypes.
        cond: the subject's condition (:func:`~dreampose.pipeline.conditioning.encode_image_condition`).
        poses: the pose windows (:func:`~dreampose.pipeline.poses.make_pose_windows`).
        options: steps, sampler, guidance scales, start mode, frames per UNet call.
        generator: CPU generator of every draw (x_T; ancestral sampler noise).
        latents: x_T to start from (``[1|F,4,h,w]``) instead of computing it.
        callback: ``callback(done, total, chunk_latents)`` after every step; raising from it cancels.
        stats: filled with the UNet calls, the batch and x_T.

    Yields:
        ``(frames, latents)`` per chunk as soon as it is denoised: a slice of the frame range and
        ``[n,4,h,w]`` float32 latents on the UNet's device. x_T is kept as one shared latent (or the
        injected tensor), never as a per-frame copy, so memory does not grow with the frame count.
    """
    check_run(poses, options)
    check_condition_source(model, cond)   # the convention may be chosen per call (parity runs): not checked
    sources = consistency_sources(options)
    if sources:
        shared = SharedAttention(sources)
        with shared_self_attention(model.unet, shared):
            yield from _denoise(model, cond, poses, options, generator, latents, callback, stats, shared)
    else:
        yield from _denoise(model, cond, poses, options, generator, latents, callback, stats, None)


def _denoise(model, cond, poses, options, generator, latents, callback, stats, shared):
    """:func:`denoise`'s loop; ``shared``: the shared self-attention routed through the UNet, or None."""
    t0 = time.perf_counter()
    device = next(model.unet.parameters()).device
    scheduler = make_scheduler(options.sampler, model.scheduler_config)
    scheduler.set_timesteps(options.steps, device=device)
    total, per_call = len(poses), options.frames_per_batch
    noise = reference = anchor = None
    if latents is None:
        key_latent, noise = start_components(model, cond, options, generator=generator, device=device)
        x_start = compose_start(scheduler, key_latent, noise)
    else:
        x_start = check_latents(latents, poses)[:latents.shape[0]].to(device)
        key_latent = None
    if shared is not None:
        if noise is None:     # injected x_T: the record rows get a noise of their own, from the seed
            shape = (1, LATENT_CHANNELS, options.height // LATENT_SCALE, options.width // LATENT_SCALE)
            noise = randn(shape, torch.Generator().manual_seed(options.seed), device)
        if "reference" in shared.sources:
            reference = reference_latent(model.vae, cond, options, key_latent).to(device)
    if stats is not None:
        stats.init_latents = x_start.expand(total, -1, -1, -1)
    cond_dev = cond.to(device)
    steps_total = len(scheduler.timesteps) * -(-total // per_call)
    done = 0
    for first in range(0, total, per_call):
        frames = slice(first, min(first + per_call, total))
        denoiser = DualCFGDenoiser(model.unet, cond_dev.cond, cond_dev.uncond, poses.windows(frames).to(device),
                                   options.s_image, options.s_pose, (options.guidance_start, options.guidance_end))
        chunk_sched = make_scheduler(options.sampler, model.scheduler_config)
        chunk_sched.set_timesteps(options.steps, device=device)
        if shared is not None:
            denoiser = ConsistentDenoiser(denoiser, shared, chunk_sched, noise, reference=reference, anchor=anchor)
        if x_start.shape[0] == 1:
            x = x_start.expand(frames.stop - frames.start, -1, -1, -1).clone()
        else:
            x = x_start[frames].clone()
        extra = {"generator": generator} if options.sampler == "euler_a" else {}
        for t in chunk_sched.timesteps:
            eps = denoiser(chunk_sched.scale_model_input(x, t), t)
            x = chunk_sched.step(eps, t, x, **extra).prev_sample
            done += 1
            if callback is not None:
                callback(done, steps_total, x)
        if stats is not None:
            stats.unet_calls += denoiser.calls
            stats.image_evaluations += denoiser.evaluations
            stats.unet_batch = max(stats.unet_batch, len(denoiser.branches) * denoiser.frames)
            stats.sample_s += time.perf_counter() - t0
        keep = anchor_frame(options, frames, anchor is not None) if shared is not None else None
        if keep is not None and "anchor" in shared.sources:
            anchor = (x[keep - frames.start:keep - frames.start + 1].clone(), poses.windows([keep]).to(device))
        del denoiser, chunk_sched
        yield frames, x
        t0 = time.perf_counter()
    if stats is not None:
        stats.frames += total


@torch.no_grad()
def sample(model, cond: ImageCondition, poses: PoseWindows, options: SamplingOptions, *,
           generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
           callback: StepCallback | None = None, stats: SampleStats | None = None) -> torch.Tensor:
    """Every frame's final latents at once: ``[F,4,H/8,W/8]`` float32 on the UNet's device.
    Arguments as :func:`denoise`."""
    out = None
    for frames, x in denoise(model, cond, poses, options, generator=generator, latents=latents, callback=callback,
                             stats=stats):
        if out is None:
            out = x.new_empty((len(poses), *x.shape[1:]))
        out[frames] = x
    return out


@torch.no_grad()
def decode(model, latents: torch.Tensor, *, batch_size: int | None = None,
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """SD-scaled latents ``[F,4,h,w]`` → frames ``[F,H,W,3]`` float 0..1 on the CPU.

    Args:
        batch_size: frames per VAE call (all at once when None).
        callback: ``callback(done, total)`` after every batch.
    """
    vae = model.vae
    param = next(vae.parameters())
    count = latents.shape[0]
    batch_size = batch_size or count
    video = None
    for i in range(0, count, batch_size):
        z = latents[i:i + batch_size].to(param.device, param.dtype) / VAE_SCALE
        img = (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        if video is None:
            video = img.new_empty((count, *img.shape[1:]))
        video[i:i + img.shape[0]] = img
        if callback is not None:
            callback(min(i + batch_size, count), count)
    return video


def stretch_frames(video: torch.Tensor, stretch: str) -> torch.Tensor:
    """Contrast stretch of decoded frames ``[F,H,W,3]``, in place (no copy of the clip), returned.

    ``per_frame`` is the authors' test.py min-max stretch (it flickers brightness: docs/official-code.md,
    quirk #8); ``sequence`` stretches with one min/max for the whole clip; ``none`` leaves pixels as decoded.
    """
    check_stretch(stretch)
    if stretch == "per_frame":
        for frame in video:
            lo, hi = frame.min(), frame.max()
            frame.sub_(lo).div_((hi - lo).clamp_min(1e-8))
    elif stretch == "sequence":
        lo, hi = video.min(), video.max()
        video.sub_(lo).div_((hi - lo).clamp_min(1e-8))
    return video
