"""Turning a Stable Diffusion 1.x UNet into the DreamPose UNet (paper §4.2).

The only architectural change is ``conv_in``: 4 latent channels plus 10 pose channels (five
DensePose UV frames). The latent weights and the bias are copied from the pretrained layer and the
10 pose channels start at zero, so a fresh DreamPose UNet computes exactly what the base UNet did.
(The authors' script dropped the pretrained bias and, in released history, zeroed latent channel 3
too; both are fixed here: docs/official-code.md, quirks #1 and #2.)
"""
from __future__ import annotations

from copy import deepcopy

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..configs import clean_config
from ..settings import LATENT_CHANNELS, UNET_IN_CHANNELS


def unet_config_with_pose(config: dict) -> dict:
    """A UNet config that builds the 14-channel model (the authors' saved configs wrongly say 4)."""
    config = clean_config(config)
    config["in_channels"] = UNET_IN_CHANNELS
    return config


def expand_conv_in(base: UNet2DConditionModel, copy: bool = True) -> UNet2DConditionModel:
    """``base`` with a ``conv_in`` that also takes the 10 pose channels, zero-initialised: a copy, or with
    ``copy=False`` ``base`` itself changed (no second UNet in memory, for a base loaded only to be widened)."""
    old = base.conv_in
    if old.in_channels != LATENT_CHANNELS:
        raise ValueError(f"expected a base UNet with {LATENT_CHANNELS} input channels, got {old.in_channels}")
    unet = deepcopy(base) if copy else base
    new = nn.Conv2d(UNET_IN_CHANNELS, old.out_channels, kernel_size=old.kernel_size,
                    stride=old.stride, padding=old.padding, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :LATENT_CHANNELS] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=UNET_IN_CHANNELS)
    return unet
