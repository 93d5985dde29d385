"""Image conditioning: the key frame through CLIP and the VAE, joined by the adapter (paper §4.2).

Two conventions exist because the authors' inference and training code disagree
(docs/official-code.md, quirks #4, #5 and #7):

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

from ..errors import DreamPoseError
from ..models.fingerprint import fingerprints_match, weights_fingerprint
from ..settings import COND_HEIGHT, COND_WIDTH, VAE_SCALE, check_convention, check_latent_mode
from .images import clip_pixels, condition_frame, to_minus1_1


@dataclass
class ImageCondition:
    """What the sampler needs from the subject photo, computed once."""

    cond: torch.Tensor       # [1,50,768] adapter output for the key frame
    uncond: torch.Tensor     # [1,50,768] adapter output for the null image
    key_frame: torch.Tensor  # [1,3,640,512] uint8, for the official start latent
    convention: str
    source: tuple = ()       # source_fingerprint of the model that encoded it; () = unknown, not checked

    def to(self, device=None, dtype=None) -> "ImageCondition":
        return ImageCondition(self.cond.to(device=device, dtype=dtype), self.uncond.to(device=device, dtype=dtype),
                              self.key_frame, self.convention, self.source)


def source_fingerprint(model) -> tuple:
    """Which model a condition came from, in any dtype
    (:func:`~dreampose.models.fingerprint.weights_fingerprint`): its adapter. The adapter is what every
    DreamPose checkpoint and every subject finetune trains (CLIP and the VAE encoder stay frozen), and it
    is the same module on the library's and on ComfyUI's route, whose CLIP and VAE are other classes
    with other tensor names."""
    return tuple(weights_fingerprint(model.adapter))


def vae_latent(vae, pixels: torch.Tensor, latent_mode: str = "sample",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled VAE latent of pixels already in the VAE's input range; ``sample`` draws from ``generator``."""
    check_latent_mode(latent_mode)
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
def encode_image_condition(model, image: torch.Tensor, *, latent_mode: str = "sample",
                           generator: torch.Generator | None = None, convention: str | None = None) -> ImageCondition:
    """Encode one key frame into the condition and its null, for dual guidance.

    Args:
        model: a :class:`~dreampose.models.bundle.DreamPoseModel` (its CLIP, VAE and adapter are used
            where they are, in their dtypes).
        image: ``[3,H,W]`` (or ``[1,3,H,W]``) RGB, float 0..1 or uint8, any size: it is resized to
            640×512 with PIL's bicubic filter, as the authors did.
        latent_mode: ``sample`` draws the VAE latent from its posterior (the authors' way, quirk #13),
            ``mode`` takes its mean.
        generator: CPU generator for the ``sample`` draws, in this order: key frame, then null image.
        convention: overrides ``model.convention`` (``official`` or ``standard``).

    Returns:
        An :class:`ImageCondition` (``cond`` and ``uncond`` ``[1,50,768]``, the resized key frame).
    """
    convention = check_convention(convention or model.convention)
    key_u8 = condition_frame(image)
    clip_param = next(model.clip.parameters())
    clip_in = torch.cat([clip_pixels(key_u8), clip_pixels(torch.zeros_like(key_u8))])
    clip_tokens = model.clip(pixel_values=clip_in.to(clip_param.device, clip_param.dtype)).last_hidden_state
    key_in, null_in = vae_inputs(key_u8, convention)
    key_lat = vae_latent(model.vae, key_in, latent_mode, generator)
    null_lat = vae_latent(model.vae, null_in, latent_mode, generator)
    ad_param = next(model.adapter.parameters())
    place = {"device": ad_param.device, "dtype": ad_param.dtype}
    cond = model.adapter(clip_tokens[:1].to(**place), key_lat.to(**place))
    uncond = model.adapter(clip_tokens[1:].to(**place), null_lat.to(**place))
    return ImageCondition(cond, uncond, key_u8, convention, source_fingerprint(model))


def check_condition(model, cond) -> ImageCondition:
    """A condition made by a model of another width or convention, or by other weights (another DreamPose
    checkpoint, a finetune's adapter), would sample garbage or the wrong subject: say so now."""
    check_condition_fits(cond, model.unet.config.cross_attention_dim, model.convention)
    return check_condition_source(model, cond)


def check_condition_source(model, cond: ImageCondition) -> ImageCondition:
    """``cond`` was encoded by ``model``'s adapter (conditions without a recorded source are let through)."""
    if cond.source and not fingerprints_match(list(cond.source), list(source_fingerprint(model))):
        raise DreamPoseError("the condition was encoded by another DreamPose model (other adapter weights) than "
                             "the one sampling it; encode the key frame again with this model (after any subject "
                             "finetune)")
    return cond


def check_condition_fits(cond, width: int, convention: str) -> ImageCondition:
    """:func:`check_condition` against a UNet's cross-attention ``width`` and a model's ``convention``."""
    if not isinstance(cond, ImageCondition):
        raise DreamPoseError(f"expected a DreamPose condition from CLIPVAEAdapterEncode, got {type(cond).__name__}")
    if cond.cond.shape[-1] != width:
        raise DreamPoseError(f"the condition has width {cond.cond.shape[-1]} but this UNet attends to width {width}: "
                             "encode the key frame with the same DreamPose model")
    if cond.convention != convention:
        raise DreamPoseError(f"the condition was encoded in the {cond.convention!r} convention but the model runs "
                             f"{convention!r}: encode the key frame with the same model")
    return cond
