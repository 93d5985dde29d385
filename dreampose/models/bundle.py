"""The DreamPose model: its four networks plus the facts that decide how they are used.

A :class:`DreamPoseModel` holds the 14-channel UNet, the CLIP-VAE adapter, the VAE and the CLIP
vision tower, the conditioning convention (a property of the checkpoint: docs/official-code.md,
quirks #4 and #5) and the scheduler config. It is what every stage after loading takes: encoding,
sampling, finetuning, training, evaluation, and the ComfyUI nodes' ``DREAMPOSE_MODEL``.
:func:`save_bundle` writes it in our format (``unet.*``, ``adapter.*``, optional ``vae.*`` and
``clip.*`` tensors, configs and convention in the safetensors metadata); reading it back is
:func:`dreampose.loaders.load.load_dreampose`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionModel

from ..configs import default_scheduler_config
from ..errors import DreamPoseError
from ..files.atomic import atomic_save_safetensors
from ..files.weights import format_metadata, normalise_clip_keys
from ..settings import LATENT_CHANNELS, UNET_IN_CHANNELS
from .adapter import EmbeddingAdapter

CLIP_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")


@dataclass
class DreamPoseModel:
    unet: UNet2DConditionModel
    adapter: EmbeddingAdapter
    vae: AutoencoderKL
    clip: CLIPVisionModel
    convention: str = "official"
    scheduler_config: dict = field(default_factory=default_scheduler_config)
    info: dict = field(default_factory=dict)   # provenance: files, base model, what was finetuned

    def check_compatible(self) -> None:
        """The parts must agree on widths and token counts; say which part is wrong if not."""
        clip_cfg = self.clip.config
        tokens = (clip_cfg.image_size // clip_cfg.patch_size) ** 2 + 1
        if self.unet.config.in_channels != UNET_IN_CHANNELS:
            raise DreamPoseError(f"the UNet takes {self.unet.config.in_channels} input channels, DreamPose needs "
                                 f"{UNET_IN_CHANNELS} (4 latent + 10 pose)")
        if clip_cfg.hidden_size != self.adapter.clip_width or tokens != self.adapter.clip_tokens:
            raise DreamPoseError(
                f"the CLIP vision model gives {tokens} tokens of width {clip_cfg.hidden_size}, the adapter expects "
                f"{self.adapter.clip_tokens}×{self.adapter.clip_width}: use CLIP ViT-B/32 "
                "(openai/clip-vit-base-patch32)")
        if self.unet.config.cross_attention_dim != self.adapter.clip_width:
            raise DreamPoseError(f"the UNet's cross-attention width {self.unet.config.cross_attention_dim} does not "
                                 f"match the adapter's {self.adapter.clip_width}: the UNet is not Stable Diffusion 1.x")
        if self.vae.config.latent_channels != LATENT_CHANNELS:
            raise DreamPoseError("the VAE must have 4 latent channels (the Stable Diffusion 1.x VAE)")

    def to(self, device=None, unet_dtype=None, vae_dtype=None, clip_dtype=None) -> "DreamPoseModel":
        """Move in place (networks are large: no copies) and return self; ``None`` keeps a dtype.

        Uses ``nn.Module.to`` directly: diffusers' override logs a "modules that should be kept in
        float32" warning whenever ``dtype=`` is given, which would only confuse a user.
        """
        for module, dtype in ((self.unet, unet_dtype), (self.adapter, unet_dtype),
                              (self.vae, vae_dtype), (self.clip, clip_dtype)):
            torch.nn.Module.to(module, *(a for a in (device, dtype) if a is not None))
        return self

    def place(self, device, dtype: torch.dtype) -> "DreamPoseModel":
        """UNet, adapter and VAE in ``dtype`` on ``device``; CLIP stays fp32 (it runs once per subject,
        as in the authors' inference). In place; returns self."""
        return self.to(device, dtype, dtype, torch.float32)

    def shallow_copy(self, **changes) -> "DreamPoseModel":
        return replace(self, **changes)

    def save(self, path: str, include_vae: bool = False, **meta) -> str:
        """Our safetensors format: ``unet.*`` ``adapter.*`` (``vae.*``), configs and convention in metadata."""
        return save_bundle(path, self.unet, self.adapter, self.vae if include_vae else None,
                           convention=self.convention, scheduler_config=self.scheduler_config, **meta)


def adapter_config(adapter: EmbeddingAdapter) -> dict:
    """The adapter's sizes, as stored in our metadata."""
    return {"clip_width": adapter.clip_width, "clip_tokens": adapter.clip_tokens,
            "vae_tokens": adapter.vae_tokens, "vae_features": adapter.vae_features}


def save_bundle(path: str, unet, adapter: EmbeddingAdapter, vae=None, clip=None, dtype: torch.dtype | None = None,
                **meta) -> str:
    """Write networks in our format atomically; their configs go into the metadata.

    Args:
        clip: also embed the CLIP vision tower (a self-contained file, e.g. the shipped demo model).
        dtype: store floating tensors in this dtype (fp16 halves the file).
        meta: further metadata fields (dicts and lists are stored as JSON).

    Returns:
        ``path``.
    """
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"adapter.{k}": v for k, v in adapter.state_dict().items()})
    configs = {"unet_config": dict(unet.config), "adapter_config": adapter_config(adapter)}
    if vae is not None:
        tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
        configs["vae_config"] = dict(vae.config)
    if clip is not None:
        tensors.update({f"clip.{k}": v for k, v in normalise_clip_keys(clip.state_dict()).items()})
        configs["clip_config"] = {k: v for k, v in clip.config.to_dict().items() if k in CLIP_CONFIG_KEYS}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return atomic_save_safetensors(tensors, path, format_metadata(**configs, **meta))


def fresh_adapter(clip: CLIPVisionModel, seed: int = 0) -> EmbeddingAdapter:
    """A newly initialised adapter sized for ``clip`` (seeded: the official init has a random bias)."""
    cfg = clip.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EmbeddingAdapter(cfg.hidden_size, (cfg.image_size // cfg.patch_size) ** 2 + 1).eval()
