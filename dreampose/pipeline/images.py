"""Key-frame pixels: validation, resizing and the CLIP preprocessing, all on uint8 like the authors.

The official code worked on PIL images: the key frame was resized with PIL's bicubic filter, CLIP
saw it through ``CLIPProcessor`` (shortest side to 224 with PIL bicubic, centre crop 224, /255,
CLIP mean/std). We do the same arithmetic on tensors so that a ComfyUI IMAGE and a PNG on disk give
identical conditioning, and so ``official`` mode reproduces the authors' inputs exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import DreamPoseError
from ..settings import COND_HEIGHT, COND_WIDTH

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def check_image(image: torch.Tensor) -> torch.Tensor:
    """Accept one RGB image ``[3,H,W]``/``[1,3,H,W]`` (float 0..1 or uint8); return uint8 ``[1,3,H,W]``."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise DreamPoseError(f"expected one image [3,H,W], got shape {tuple(image.shape)}")
    if image.shape[0] != 1:
        raise DreamPoseError(f"expected one key frame, got a batch of {image.shape[0]}; pick one image")
    channels = image.shape[1]
    if channels != 3:
        kind = {1: "greyscale", 2: "greyscale+alpha", 4: "RGBA"}.get(channels, f"{channels}-channel")
        raise DreamPoseError(f"the key frame is {kind}; DreamPose needs an RGB image (convert it to RGB first)")
    if image.dtype == torch.uint8:
        return image.cpu()
    if not torch.isfinite(image).all():
        raise DreamPoseError("the key frame contains NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -0.5 or high > 1.5:     # a little over/undershoot (sharpening, resampling) is clipped, as before
        hint = "; it looks like 0..255 values: divide by 255 (or give uint8)" if low >= 0 and high <= 255 else ""
        raise DreamPoseError(f"a float key frame must hold values in 0..1, found {low:g} … {high:g}{hint}")
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def _to_pil(image_u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(image_u8[0].permute(1, 2, 0).numpy())


def _from_pil(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).unsqueeze(0)


def resize_u8(image_u8: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL bicubic resize of a uint8 ``[1,3,H,W]`` image (what the official ``Image.resize`` did)."""
    if tuple(image_u8.shape[-2:]) == (height, width):
        return image_u8
    return _from_pil(_to_pil(image_u8).resize((width, height), Image.BICUBIC))


def condition_frame(image: torch.Tensor) -> torch.Tensor:
    """A key frame (``[3,H,W]``/``[1,3,H,W]``, 0..1 or uint8, any size) as the condition sees it: uint8
    ``[1,3,640,512]``, PIL bicubic as the authors resized it."""
    return resize_u8(check_image(image), COND_HEIGHT, COND_WIDTH)


def clip_pixels(image_u8: torch.Tensor) -> torch.Tensor:
    """``CLIPProcessor`` arithmetic: shortest side → 224 (PIL bicubic), centre crop 224, normalise."""
    _, _, h, w = image_u8.shape
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(CLIP_SIZE * long / short)
    new_h, new_w = (CLIP_SIZE, new_long) if h <= w else (new_long, CLIP_SIZE)
    resized = resize_u8(image_u8, new_h, new_w)
    top, left = (new_h - CLIP_SIZE) // 2, (new_w - CLIP_SIZE) // 2
    crop = resized[:, :, top:top + CLIP_SIZE, left:left + CLIP_SIZE].float() * (1 / 255)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (crop - mean) / std


def to_minus1_1(image_u8: torch.Tensor) -> torch.Tensor:
    return image_u8.float() / 255 * 2 - 1
