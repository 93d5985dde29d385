"""Long videos: frames are denoised and decoded chunk by chunk (``pipeline.animate.generate``), so the
working memory beyond the output buffer stays flat with the number of frames.

Memory is the process RSS (``/proc/self/statm``, freed heap trimmed first) sampled at every step and
every chunk; torch's CPU tensors live outside tracemalloc. The output buffer is allocated and touched
before the baseline.
"""
from __future__ import annotations

import ctypes
import gc
import os

import pytest
import torch

from dreampose.data.synthetic import synthetic_key_frame, synthetic_uv_sequence
from dreampose.demo.tiny import tiny_dreampose
from dreampose.pipeline.animate import generate
from dreampose.pipeline.conditioning import encode_image_condition
from dreampose.pipeline.poses import make_pose_windows
from dreampose.pipeline.sampling import decode, sample
from dreampose.settings import SamplingOptions

SIZE = 64
PAGE = os.sysconf("SC_PAGE_SIZE")
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def trim() -> None:
    """Give freed heap back to the OS, so RSS counts live memory (else a freed block keeps it high)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.fixture(scope="module")
def setup():
    model = tiny_dreampose(seed=0)
    with torch.inference_mode():
        cond = encode_image_condition(model, synthetic_key_frame(SIZE, SIZE), latent_mode="mode")
    uv = synthetic_uv_sequence(frames=240, height=SIZE, width=SIZE)
    return model, cond, uv


def run(model, cond, uv, frames: int) -> tuple[int, float]:
    """Peak RSS growth over the baseline (output already allocated) for ``frames`` frames."""
    windows = make_pose_windows(uv[:frames], height=SIZE, width=SIZE)
    video = torch.zeros(frames, SIZE, SIZE, 3)  # the unavoidable output, touched before the baseline
    latents = torch.zeros(frames, 4, SIZE // 8, SIZE // 8)
    peak = [0]

    def probe(*_):
        peak[0] = max(peak[0], rss())

    trim()
    base = rss()
    with torch.inference_mode():
        options = SamplingOptions(width=SIZE, height=SIZE, steps=1, sampler="ddim", frames_per_batch=4)
        for chunk in generate(model, cond, windows, options, generator=torch.Generator().manual_seed(0),
                              callback=probe):
            video[chunk.frames] = chunk.images
            latents[chunk.frames] = chunk.latents
            probe()
    return peak[0] - base


def test_generate_equals_sample_then_decode(setup):
    model, cond, uv = setup
    windows = make_pose_windows(uv[:7], height=SIZE, width=SIZE)
    options = SamplingOptions(width=SIZE, height=SIZE, steps=2, sampler="euler_a", frames_per_batch=3,
                              start="official")
    with torch.inference_mode():
        want = sample(model, cond, windows, options, generator=torch.Generator().manual_seed(5))
        want_frames = decode(model, want, batch_size=3)
        got = list(generate(model, cond, windows, options, generator=torch.Generator().manual_seed(5)))
    assert [c.frames for c in got] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert torch.equal(torch.cat([c.latents for c in got]), want.cpu())
    assert torch.equal(torch.cat([c.images for c in got]), want_frames)


def test_memory_flat_with_length(setup):
    model, cond, uv = setup
    run(model, cond, uv, 8)  # warm up allocator, thread pools, kernels
    short = run(model, cond, uv, 60)
    long = run(model, cond, uv, 240)
    # beyond the output, 240 frames must not need more than 60 did (allocator noise is ~1.5 MB here);
    # sampling everything, then decoding into a second clip-sized tensor grows by ~9 MB from 60 to 240
    assert long - short < 4 * 2**20, (short, long)
