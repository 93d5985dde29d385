"""The one inference entry point: a key frame and a DensePose sequence in, video frames out.

The steps are the paper's (§4): 1. encode the subject once (CLIP + VAE → adapter, and the null
image, for guidance); 2. build the 5-frame pose windows at the output size; 3. denoise every frame
with dual classifier-free guidance from a start latent shared by all frames; 4. decode. The
command line, the demo, ``eval``, ``bench`` and the ComfyUI sampler node all run through here
(the nodes split the graph after step 1 and 2, and call :func:`generate`).

:func:`animate` streams: each chunk of frames is denoised, decoded and handed over before the next
starts, so memory stays flat however long the video. :func:`animate_clip` collects the whole clip.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..settings import WINDOW_OFFSETS, SamplingOptions
from .conditioning import ImageCondition, encode_image_condition
from .poses import PoseWindows, make_pose_windows, smooth_uv
from .sampling import SampleStats, StepCallback, decode, denoise, stretch_frames


@dataclass
class Chunk:
    """Frames ``frames`` of the video, as soon as they are done (both tensors float32 on the CPU)."""

    frames: slice
    latents: torch.Tensor   # [n,4,H/8,W/8], SD-scaled (multiply by 1/0.18215 for ComfyUI's LATENT)
    images: torch.Tensor    # [n,H,W,3] 0..1


@dataclass
class Animation:
    """A whole clip: frames ``[F,H,W,3]`` 0..1 (stretched as the options say), latents ``[F,4,h,w]``."""

    frames: torch.Tensor
    latents: torch.Tensor
    stats: SampleStats = field(default_factory=SampleStats)


def prepare(model, image: torch.Tensor, uv: torch.Tensor, options: SamplingOptions, *,
            generator: torch.Generator | None = None, offsets: tuple[int, ...] = WINDOW_OFFSETS,
            frames: slice | None = None) -> tuple[ImageCondition, PoseWindows]:
    """Steps 1 and 2: the subject's condition (drawing from ``generator``) and the pose windows (of the
    ``frames`` range only, each window still filled from the whole sequence: :meth:`PoseWindows.select`),
    from the UV smoothed over time first when ``options.uv_smoothing`` asks (the whole sequence)."""
    options.check()
    windows = make_pose_windows(smooth_uv(uv, options.uv_smoothing), options.height, options.width, offsets)
    if frames is not None:
        windows = windows.select(frames)        # checked before the encoders run
    cond = encode_image_condition(model, image, latent_mode=options.conditioning_latent, generator=generator)
    return cond, windows


@torch.no_grad()
def generate(model, cond: ImageCondition, poses: PoseWindows, options: SamplingOptions, *,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             callback: StepCallback | None = None, stats: SampleStats | None = None) -> Iterator[Chunk]:
    """Steps 3 and 4, streamed: per chunk of ``options.frames_per_batch`` frames, denoise, decode
    and yield a :class:`Chunk` before the next chunk starts. Nothing of a chunk is kept here.

    Args as :func:`dreampose.pipeline.sampling.denoise`. ``options.stretch`` needs the whole clip and
    is not applied: :func:`animate_clip` applies it, or call ``stretch_frames`` on the collected frames.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(options.seed)
    for frames, x in denoise(model, cond, poses, options, generator=generator, latents=latents, callback=callback,
                             stats=stats):
        t0 = time.perf_counter()
        images = decode(model, x)
        if stats is not None:
            stats.decode_s += time.perf_counter() - t0
        yield Chunk(frames, x.float().cpu(), images)
        del x, images


@torch.no_grad()
def animate(model, image: torch.Tensor, uv: torch.Tensor, options: SamplingOptions, *,
            generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
            callback: StepCallback | None = None, stats: SampleStats | None = None,
            offsets: tuple[int, ...] = WINDOW_OFFSETS, frames: slice | None = None) -> Iterator[Chunk]:
    """Animate ``image`` along ``uv``, streaming chunks of frames.

    Args:
        model: a :class:`~dreampose.models.bundle.DreamPoseModel`, placed where it should run.
        image: the key frame ``[3,H,W]``, float 0..1 or uint8, any size.
        uv: DensePose UV ``[F,2,h,w]`` (U then V, 0 on the background), any size.
        options: output size, sampler, steps, guidance scales, start mode, seed, frames per UNet call.
        generator: CPU generator of every random draw, in this order: the condition's VAE samples,
            x_T, ancestral noise. Default: one seeded with ``options.seed``.
        latents: x_T (``[1|F,4,H/8,W/8]``) to start from instead of computing it.
        callback: ``callback(done, total, chunk_latents)`` after every denoising step; raising from it
            cancels the run (ComfyUI's interrupt).
        stats: filled with what the loop did (UNet calls and batch, x_T).
        offsets: the pose window, ``(-2, -1, 0, 1, 2)``; ``(0,) * 5`` is the paper's 1-pose ablation.
        frames: render only this range of the sequence (``slice(start, end)``); its windows see their real
            neighbours, so with a deterministic sampler the frames are those of the whole run. Chunks then
            count from the range's first frame.

    Yields:
        :class:`Chunk` objects in frame order.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(options.seed)
    t0 = time.perf_counter()
    cond, poses = prepare(model, image, uv, options, generator=generator, offsets=offsets, frames=frames)
    if stats is not None:
        stats.encode_s += time.perf_counter() - t0
    yield from generate(model, cond, poses, options, generator=generator, latents=latents, callback=callback,
                        stats=stats)


@torch.no_grad()
def animate_clip(model, image: torch.Tensor, uv: torch.Tensor, options: SamplingOptions, *,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 callback: StepCallback | None = None, on_chunk=None,
                 offsets: tuple[int, ...] = WINDOW_OFFSETS, frames: slice | None = None) -> Animation:
    """:func:`animate`, collected into one :class:`Animation` (output stretched as ``options.stretch``
    says). ``on_chunk(chunk, total_frames)`` is called as each chunk arrives (decoding progress).
    ``frames``: only that range of the sequence (:func:`animate`); the Animation holds just those."""
    stats = SampleStats()
    images = latents_out = None
    count = uv.shape[0] if uv.ndim == 4 else 1
    total = len(range(*frames.indices(count))) if frames is not None else count
    for chunk in animate(model, image, uv, options, generator=generator, latents=latents, callback=callback,
                         stats=stats, offsets=offsets, frames=frames):
        if images is None:
            images = chunk.images.new_empty((total, *chunk.images.shape[1:]))
            latents_out = chunk.latents.new_empty((total, *chunk.latents.shape[1:]))
        images[chunk.frames] = chunk.images
        latents_out[chunk.frames] = chunk.latents
        if on_chunk is not None:
            on_chunk(chunk, total)
    return Animation(stretch_frames(images, options.stretch), latents_out, stats)
