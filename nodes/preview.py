"""Live previews while DualCFGSampler denoises, through ComfyUI's own latent preview machinery.

``latent_preview.get_previewer`` honours the user's ``--preview-method`` (none, latent2rgb, taesd,
auto) exactly as core samplers do; DreamPose's latents are SD 1.x latents in the model's scaled
space, which is what core hands its previewers too, so ``comfy.latent_formats.SD15`` fits. The
preview is the current chunk's first frame, and it is throttled so it never costs noticeable time.
"""
from __future__ import annotations

import time

import torch
import comfy.latent_formats
import comfy.model_management as mm
import latent_preview

PREVIEW_FORMAT = "JPEG"
MIN_INTERVAL_S = 0.25  # at most four previews a second (core previews every step; ours may be tiny steps)


class ChunkPreviewer:
    """Call with a chunk's latents ``[n,4,h,w]``: the ``(format, image, max_size)`` tuple
    ``ProgressBar.update_absolute`` takes, or None (previews off, or throttled)."""

    def __init__(self, min_interval_s: float = MIN_INTERVAL_S):
        self.previewer = latent_preview.get_previewer(mm.get_torch_device(), comfy.latent_formats.SD15())
        self.min_interval_s = min_interval_s
        self.last = None

    def __call__(self, latents: torch.Tensor):
        if self.previewer is None:
            return None
        now = time.monotonic()
        if self.last is not None and now - self.last < self.min_interval_s:
            return None
        self.last = now
        return self.previewer.decode_latent_to_preview_image(PREVIEW_FORMAT, latents[:1].float())
