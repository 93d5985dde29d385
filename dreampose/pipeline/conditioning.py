"""Image conditioning: the key frame through CLIP and the VAE, joined by the adapter (paper §4.2).

Two conventions exist because the authors' inference and training code disagree
(official-code-notes.md §2 and §8, design.md):

* ``official`` – bit-for-bit the released inference: the VAE conditioning path gets raw 0..255
  pixels, and the null image's VAE input is built transposed (W×H). Use with the authors' weights.
* ``standard`` – the VAE gets −1..1 pixels and the null image is a black H×W frame. Checkpoints we
  train use it, and training and inference share it.

CLIP sees the uint8 key frame the same way in both. The conditioning branch always runs at
640×512 because the adapter's ``Linear(1280, 768)`` is sized for that latent. Everything here runs
once per subject, never per frame or per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.adapter import EmbeddingAdapter
from ..errors import DreamPoseError
from .images import check_image, clip_pixels, resize_u8, to_minus1_1

CONVENTIONS = ("official", "standard")
LATENT_MODES = ("sample", "mode")
COND_HEIGHT, COND_WIDTH = 640, 512
VAE_SCALE = 0.18215  # a literal in the official code, equal to SD 1.x's scaling_factor


@dataclass
class ImageCondition:
    """What the sampler needs from the subject photo, computed once."""

    cond: torch.Tensor       # [1,50,768] adapter output for the key frame
    uncond: torch.Tensor     # [1,50,768] adapter output for the null image
    key_frame: torch.Tensor  # [1,3,640,512] uint8, for the official start latent
    convention: str

    def to(self, device=None, dtype=None) -> "ImageCondition":
        return ImageCondition(self.cond.to(device=device, dtype=dtype), self.uncond.to(device=device, dtype=dtype),
                              self.key_frame, self.convention)


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise DreamPoseError(f"unknown conditioning convention {convention!r}; use one of {CONVENTIONS}")
    return convention


def vae_latent(vae, pixels: torch.Tensor, latent_mode: str = "sample",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled VAE latent of pixels already in the VAE's input range; ``sample`` draws from ``generator``."""
    if latent_mode not in LATENT_MODES:
        raise DreamPoseError(f"conditioning latent must be one of {LATENT_MODES}, got {latent_mode!r}")
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
    latent = dist.sample(generator=generator) if latent_mode == "sample" else dist.mode()
    return latent * VAE_SCALE


def vae_inputs(key_u8: torch.Tensor, convention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE inputs for the key frame and the null image under ``convention``."""
    if convention == "official":
        # 0..255 pixels; null image zeros of shape (W,H,3) → encoded as [1,3,W,H] (quirks #4, #5)
        return key_u8.float(), torch.zeros(1, 3, COND_WIDTH, COND_HEIGHT)
    return to_minus1_1(key_u8), torch.full((1, 3, COND_HEIGHT, COND_WIDTH), -1.0)


@torch.no_grad()
def encode_image_condition(image: torch.Tensor, clip_vision, vae, adapter: EmbeddingAdapter, *,
                           convention: str = "official", latent_mode: str = "sample",
                           generator: torch.Generator | None = None) -> ImageCondition:
    """Encode one key frame (``[3,H,W]`` 0..1 or uint8, any size) into cond and null embeddings.

    Draw order from ``generator`` (``sample`` mode): key frame latent, then null latent.
    """
    check_convention(convention)
    key_u8 = resize_u8(check_image(image), COND_HEIGHT, COND_WIDTH)
    clip_param = next(clip_vision.parameters())
    clip_in = torch.cat([clip_pixels(key_u8), clip_pixels(torch.zeros_like(key_u8))])
    clip_tokens = clip_vision(pixel_values=clip_in.to(clip_param.device, clip_param.dtype)).last_hidden_state
    key_in, null_in = vae_inputs(key_u8, convention)
    key_lat = vae_latent(vae, key_in, latent_mode, generator)
    null_lat = vae_latent(vae, null_in, latent_mode, generator)
    ad_param = next(adapter.parameters())
    cond = adapter(clip_tokens[:1].to(ad_param.device, ad_param.dtype), key_lat.to(ad_param.device, ad_param.dtype))
    uncond = adapter(clip_tokens[1:].to(ad_param.device, ad_param.dtype), null_lat.to(ad_param.device, ad_param.dtype))
    return ImageCondition(cond, uncond, key_u8, convention)
