"""Tiny, randomly initialised networks of the real classes, for the demo, benchmarks and tests.

They have DreamPose's real interfaces (14-channel UNet, 4-channel VAE latent at 1/8 scale, CLIP
with 50 tokens from a 224-pixel image) at a fraction of the width, so the whole pipeline runs on a
laptop CPU in seconds. Random weights draw noise: they exercise the code, not the art.
"""
from __future__ import annotations

import json
import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..configs import default_scheduler_config
from ..models.bundle import DreamPoseModel, fresh_adapter
from ..models.unet import expand_conv_in

TINY_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 32, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "cross_attention_dim": 32,
    "attention_head_dim": 8, "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4, "sample_size": 64,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
# The same networks in the widths ComfyUI's own UNet and VAE code can compute (it hard-codes
# GroupNorm(32)), for the tests of the native route: core and diffusers then give the same numbers.
TINY_CORE_UNET = {**TINY_UNET, "norm_num_groups": 32}
TINY_CORE_VAE = {**TINY_VAE, "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 32}
TINY_CLIP = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": 224, "patch_size": 32, "projection_dim": 32, "hidden_act": "quick_gelu",
}


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval().requires_grad_(False)


def tiny_base_unet(seed: int = 0, core: bool = False) -> UNet2DConditionModel:
    return _seeded(seed, lambda: UNet2DConditionModel(**(TINY_CORE_UNET if core else TINY_UNET)))


def tiny_vae(seed: int = 1, core: bool = False) -> AutoencoderKL:
    return _seeded(seed, lambda: AutoencoderKL(**(TINY_CORE_VAE if core else TINY_VAE)))


def tiny_clip(seed: int = 2) -> CLIPVisionModel:
    return _seeded(seed, lambda: CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)))


def perturb_pose_weights(unet: UNet2DConditionModel, seed: int = 3, scale: float = 0.05) -> UNet2DConditionModel:
    """Give the zero-initialised pose channels of ``conv_in`` some random weight, so a tiny model's
    output depends on the pose as a trained one does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = unet.conv_in.weight
        w[:, 4:] = torch.randn(w[:, 4:].shape, generator=g) * scale
    return unet


def tiny_dreampose(seed: int = 0, pose_sensitive: bool = True, convention: str = "standard",
                   core: bool = False) -> DreamPoseModel:
    """A whole tiny DreamPose in memory (base UNet expanded to 14 channels, fresh adapter).

    Random weights, reproducible from ``seed``; the global RNG is left as it was.

    Args:
        seed: seed of the networks (the parts use ``seed`` … ``seed + 5``).
        pose_sensitive: give the pose channels of ``conv_in`` and the adapter's VAE-token weights some random
            weight, so the output depends on them as a trained model's does; ``False`` leaves both at zero, as in
            a fresh DreamPose.
        convention: the conditioning convention, ``standard`` or ``official``.
        core: 32-group norms (UNet) and 32-channel VAE levels, which ComfyUI's own UNet and VAE code can
            compute, for the native route.

    Returns:
        A :class:`~dreampose.models.bundle.DreamPoseModel` with SD 1.x's scheduler config and ``info``
        ``{"tiny": True}``.
    """
    clip = tiny_clip(seed + 2)
    unet = expand_conv_in(tiny_base_unet(seed, core))
    if pose_sensitive:
        perturb_pose_weights(unet, seed + 3)
        adapter = fresh_adapter(clip, seed + 4)
        g = torch.Generator().manual_seed(seed + 5)
        with torch.no_grad():  # let the VAE tokens matter too, as after training
            adapter.linear1.weight[:, -4:] = torch.randn(adapter.linear1.weight[:, -4:].shape, generator=g) * 0.1
    else:
        adapter = fresh_adapter(clip, seed + 4)
    return DreamPoseModel(unet, adapter, tiny_vae(seed + 1, core), clip, convention, default_scheduler_config(),
                          {"tiny": True})


def write_component(module, folder: str, weights_name: str) -> None:
    """A network as ``config.json`` (diffusers or transformers) + safetensors weights in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    if hasattr(module, "save_config"):      # diffusers
        module.save_config(folder)
    else:                                   # transformers
        module.config.to_json_file(os.path.join(folder, "config.json"))
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, os.path.join(folder, weights_name))


def write_tiny_sd_folder(folder: str, seed: int = 0, core: bool = False) -> str:
    """A diffusers-layout SD 1.x folder (``unet/``, ``vae/``, ``scheduler/``) with tiny random weights
    (``core``: 32-group norms, as :func:`tiny_dreampose`)."""
    write_component(tiny_base_unet(seed, core), os.path.join(folder, "unet"), "diffusion_pytorch_model.safetensors")
    write_component(tiny_vae(seed + 1, core), os.path.join(folder, "vae"), "diffusion_pytorch_model.safetensors")
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(default_scheduler_config(), f, indent=1)
    return folder


def write_tiny_clip_folder(folder: str, seed: int = 2, layout: str = "bare") -> str:
    """A CLIP vision folder; ``layout`` ``bare`` (transformers 5 keys) or ``vision_model`` (hub keys)."""
    clip = tiny_clip(seed)
    os.makedirs(folder, exist_ok=True)
    cfg = {"model_type": "clip_vision_model", **TINY_CLIP}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    state = {k.removeprefix("vision_model."): v.contiguous() for k, v in clip.state_dict().items()
             if not k.endswith("position_ids")}
    if layout == "vision_model":
        state = {f"vision_model.{k}": v for k, v in state.items()}
    elif layout != "bare":
        raise ValueError(f"unknown CLIP layout {layout!r}")
    save_file(state, os.path.join(folder, "model.safetensors"))
    return folder
