"""Paired augmentation for subject finetuning: the photo and its pose get the *same* crop and flip.

The paper augments "the image-and-pose pair at each step, such as by adding random cropping"
(§4.3). The authors' finetune script cropped only the pose while the loss target stayed the
un-cropped photo (docs/official-code.md §6, quirk #19), which teaches the UNet a pose that is
displaced from the picture. Here one crop box (and one flip decision) is drawn per sample and
applied to both tensors, which are at the same (training) size, so pixel (y, x) of the photo and
pixel (y, x) of the pose always describe the same point of the body.

Crop as the authors sized it, kept inside the frame: a box with the frame's aspect ratio whose
side is a random fraction in [``min_scale``, 1] of the frame's (official: ≥ 615/640 ≈ 0.96 for the
UNet finetune, ≥ 589/640 ≈ 0.92 for the VAE one), at a random position, resized back to the frame
size bilinearly. Every sample draws the same number of random values whatever is decided, so the
stream of draws from one seed does not depend on earlier outcomes.

Horizontal flips are off by default: DensePose UV has no left/right-invariant charts (a mirrored
left arm carries the left arm's U/V, not the right arm's), so a flipped pose is only geometrically
right, and an asymmetric garment would be learnt both ways round.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropBox:
    """A crop in pixels of the training-size frame: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int

    @staticmethod
    def full(height: int, width: int) -> "CropBox":
        return CropBox(0, 0, height, width)

    def is_full(self, height: int, width: int) -> bool:
        return self == CropBox.full(height, width)


def sample_crop_box(height: int, width: int, min_scale: float, generator: torch.Generator) -> CropBox:
    """A box with the frame's aspect ratio, side fraction uniform in [min_scale, 1], anywhere inside.

    Draws, in order: the scale (one uniform), the top and the left offset (one uniform each).
    """
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    scale = min_scale + (1.0 - min_scale) * u[0]
    h = max(1, min(height, round(height * scale)))
    w = max(1, min(width, round(h * width / height)))
    top = min(int(u[1] * (height - h + 1)), height - h)
    left = min(int(u[2] * (width - w + 1)), width - w)
    return CropBox(top, left, h, w)


def crop_resize(x: torch.Tensor, box: CropBox) -> torch.Tensor:
    """``x[..., box]`` resized bilinearly back to ``x``'s own size (``[C,H,W]`` or ``[B,C,H,W]``)."""
    height, width = x.shape[-2:]
    if box.is_full(height, width):
        return x
    crop = x[..., box.top:box.top + box.height, box.left:box.left + box.width]
    batched = crop if crop.ndim == 4 else crop.unsqueeze(0)
    out = F.interpolate(batched, (height, width), mode="bilinear", align_corners=False)
    return out if crop.ndim == 4 else out[0]


@dataclass(frozen=True)
class Augmentation:
    """What was done to one sample (for tests and logs)."""

    box: CropBox
    flipped: bool


def draw_augmentation(height: int, width: int, generator: torch.Generator, *, crop: bool, crop_prob: float,
                      min_scale: float, flip: bool) -> Augmentation:
    """One sample's crop box and flip. Always draws 5 values: crop yes/no, the box (3), flip yes/no."""
    do_crop = torch.rand(1, generator=generator, dtype=torch.float64).item() < crop_prob
    box = sample_crop_box(height, width, min_scale, generator)
    do_flip = torch.rand(1, generator=generator, dtype=torch.float64).item() < 0.5
    return Augmentation(box if (crop and do_crop) else CropBox.full(height, width), bool(flip and do_flip))


def apply_augmentation(x: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """Crop+resize then flip one tensor ``[C,H,W]`` (photo or pose: the same call for both)."""
    x = crop_resize(x, aug.box)
    return x.flip(-1) if aug.flipped else x


def augment_pair(image: torch.Tensor, pose: torch.Tensor | None, generator: torch.Generator, *, crop: bool = True,
                 crop_prob: float = 0.7, min_scale: float = 0.96, flip: bool = False):
    """Photo ``[3,H,W]`` and pose ``[2,H,W]`` (same H, W; pose may be None) → both augmented alike.

    Returns ``(image, pose, augmentation)``.
    """
    height, width = image.shape[-2:]
    if pose is not None and tuple(pose.shape[-2:]) != (height, width):
        raise ValueError(f"photo {tuple(image.shape[-2:])} and pose {tuple(pose.shape[-2:])} must be the same size "
                         "to share a crop box")
    aug = draw_augmentation(height, width, generator, crop=crop, crop_prob=crop_prob, min_scale=min_scale, flip=flip)
    return apply_augmentation(image, aug), (None if pose is None else apply_augmentation(pose, aug)), aug
