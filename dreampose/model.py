"""The DreamPose model bundle and how it is assembled from files.

A :class:`DreamPoseModel` holds the four networks plus the facts that decide how they are used:
the conditioning convention (design.md: a property of the checkpoint) and the scheduler config.
``load_dreampose`` resolves every path and checks that the parts fit each other *before* loading
any weights, so a wrong file costs a second, not a minute of loading.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionModel

from .adapter import EmbeddingAdapter
from .checkpoints import (atomic_save_safetensors, format_metadata, read_metadata, read_state_dict,
                          split_prefix)
from .conditioning import check_convention
from .errors import DreamPoseError
from .loading import (instantiate, load_adapter_state, load_authors_adapter, load_authors_unet,
                      load_base_unet, load_clip_vision, load_vae, read_json, shipped_config)
from .sampling import default_scheduler_config
from .unet import UNET_IN_CHANNELS, expand_conv_in, unet_config_with_pose

_AUTHORS_UNET = re.compile(r"^unet_epoch_(\d+)\.pth?$")


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
                f"{self.adapter.clip_tokens}×{self.adapter.clip_width}: use CLIP ViT-B/32 (openai/clip-vit-base-patch32)")
        if self.unet.config.cross_attention_dim != self.adapter.clip_width:
            raise DreamPoseError(f"the UNet's cross-attention width {self.unet.config.cross_attention_dim} does not "
                                 f"match the adapter's {self.adapter.clip_width}: the UNet is not Stable Diffusion 1.x")
        if self.vae.config.latent_channels != 4:
            raise DreamPoseError("the VAE must have 4 latent channels (the Stable Diffusion 1.x VAE)")

    def to(self, device=None, unet_dtype=None, vae_dtype=None, clip_dtype=None) -> "DreamPoseModel":
        """Move in place (networks are large: no copies) and return self."""
        self.unet.to(device=device, dtype=unet_dtype)
        self.adapter.to(device=device, dtype=unet_dtype)
        self.vae.to(device=device, dtype=vae_dtype)
        self.clip.to(device=device, dtype=clip_dtype)
        return self

    def shallow_copy(self, **changes) -> "DreamPoseModel":
        return replace(self, **changes)

    def save(self, path: str, include_vae: bool = False, **meta) -> str:
        """Our safetensors format: ``unet.*`` ``adapter.*`` (``vae.*``), configs and convention in metadata."""
        return save_bundle(path, self.unet, self.adapter, self.vae if include_vae else None,
                           convention=self.convention, scheduler_config=self.scheduler_config, **meta)


def save_bundle(path: str, unet, adapter: EmbeddingAdapter, vae=None, **meta) -> str:
    """Write networks in our format atomically; their configs go into the metadata."""
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"adapter.{k}": v for k, v in adapter.state_dict().items()})
    configs = {"unet_config": dict(unet.config),
               "adapter_config": {"clip_width": adapter.clip_width, "clip_tokens": adapter.clip_tokens,
                                  "vae_tokens": adapter.vae_tokens, "vae_features": adapter.vae_features}}
    if vae is not None:
        tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
        configs["vae_config"] = dict(vae.config)
    metadata = format_metadata(**configs, **meta)
    return atomic_save_safetensors(tensors, path, json.loads(json.dumps(metadata, default=_jsonable)))


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def fresh_adapter(clip: CLIPVisionModel, seed: int = 0) -> EmbeddingAdapter:
    """A newly initialised adapter sized for ``clip`` (seeded: the official init has a random bias)."""
    cfg = clip.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EmbeddingAdapter(cfg.hidden_size, (cfg.image_size // cfg.patch_size) ** 2 + 1).eval()


def _authors_adapter_beside(unet_path: str) -> str | None:
    m = _AUTHORS_UNET.match(os.path.basename(unet_path))
    if not m:
        return None
    candidate = os.path.join(os.path.dirname(unet_path), f"adapter_{m.group(1)}.pth")
    return candidate if os.path.isfile(candidate) else None


def _check_exists(path: str | None, what: str, hint: str) -> None:
    if path and not os.path.exists(path):
        raise DreamPoseError(f"{what} not found: {path!r}. {hint}")


def load_dreampose_file(path: str, unet_config: dict | None = None):
    """Our format → (unet, adapter, vae or None, metadata)."""
    meta = read_metadata(path)
    if meta.get("format") != "dreampose":
        raise DreamPoseError(f"{path}: a .safetensors file without DreamPose metadata; for the authors' files "
                             "use unet_epoch_N.pth, or convert them with `python -m dreampose convert`")
    state = read_state_dict(path)
    ucfg = unet_config_with_pose(unet_config or json.loads(meta.get("unet_config", "null"))
                                 or shipped_config("sd15_unet"))
    unet = instantiate(lambda: UNet2DConditionModel.from_config(ucfg), split_prefix(state, "unet."),
                       "14-channel DreamPose UNet", path)
    adapter = load_adapter_state(split_prefix(state, "adapter."), path)
    vae = None
    vae_state = split_prefix(state, "vae.")
    if vae_state:
        vcfg = json.loads(meta.get("vae_config", "null")) or shipped_config("sd15_vae")
        vcfg = {k: v for k, v in vcfg.items() if not k.startswith("_")}
        vae = instantiate(lambda: AutoencoderKL.from_config(vcfg), vae_state, "Stable Diffusion VAE", path)
    return unet, adapter, vae, meta


def load_dreampose(*, clip: str, dreampose: str | None = None, base: str | None = None, vae: str | None = None,
                   adapter: str | None = None, convention: str | None = None, unet_config: dict | None = None,
                   vae_config: dict | None = None, clip_config: dict | None = None) -> DreamPoseModel:
    """Assemble a DreamPose model.

    ``dreampose``: our ``.safetensors`` or the authors' ``unet_epoch_N.pth`` (its ``adapter_N.pth``
    is found beside it unless ``adapter`` is given); ``None`` builds a fresh model from ``base``.
    ``vae``: a VAE file/folder (e.g. the authors' ``vae_N.pth``); otherwise the DreamPose file's own
    VAE, otherwise ``base``'s. ``convention``: ``None`` takes the checkpoint's (authors' → official).
    """
    # 1. resolve and check every path before any weights are read
    _check_exists(clip, "CLIP vision model", "Put CLIP ViT-B/32 in models/clip_vision.")
    _check_exists(dreampose, "DreamPose weights", "Put them in models/dreampose.")
    _check_exists(base, "Stable Diffusion 1.x model", "Put it in models/checkpoints or models/diffusers.")
    _check_exists(vae, "VAE", "Leave it empty to use the base model's VAE.")
    _check_exists(adapter, "DreamPose adapter", "The authors' adapter_N.pth sits beside unet_epoch_N.pth.")
    if convention is not None:
        check_convention(convention)
    ours = bool(dreampose) and dreampose.lower().endswith((".safetensors", ".sft"))
    if ours:
        meta = read_metadata(dreampose)
        if meta.get("format") != "dreampose":
            raise DreamPoseError(f"{dreampose}: this .safetensors has no DreamPose metadata. It may be a Stable "
                                 "Diffusion checkpoint (give it as the base model) or a file from another tool")
        if "vae_config" not in meta and not vae and not base:
            raise DreamPoseError(f"{dreampose} has no VAE: also give the Stable Diffusion 1.x base model or a VAE")
    elif dreampose:
        adapter = adapter or _authors_adapter_beside(dreampose)
        if not adapter:
            raise DreamPoseError(f"{dreampose}: the authors' UNet needs its adapter_N.pth (same N) in the same "
                                 "folder, or give the adapter file explicitly")
        if not vae and not base:
            raise DreamPoseError("the authors' UNet file has no VAE: give their vae_N.pth or the Stable Diffusion "
                                 "1.x base model")
    elif not base:
        raise DreamPoseError("give DreamPose weights, or a Stable Diffusion 1.x base model to build a fresh one")

    # 2. load
    info = {"dreampose": dreampose, "base": base, "clip": clip, "vae": vae, "adapter": adapter}
    clip_model = load_clip_vision(clip, clip_config)
    file_vae = None
    scheduler_config = default_scheduler_config()
    if ours:
        unet, ad, file_vae, meta = load_dreampose_file(dreampose, unet_config)
        conv = convention or meta.get("convention", "standard")
        scheduler_config = json.loads(meta.get("scheduler_config", "null")) or scheduler_config
        info.update({k: meta[k] for k in ("finetuned", "base_model", "subject") if k in meta})
    elif dreampose:
        unet = load_authors_unet(dreampose, unet_config)
        ad = load_authors_adapter(adapter)
        conv = convention or "official"
    else:
        unet = expand_conv_in(load_base_unet(base, unet_config))
        ad = fresh_adapter(clip_model)
        conv = convention or "standard"
    if vae:
        vae_model = load_vae(vae, vae_config)
    elif file_vae is not None:
        vae_model = file_vae
    else:
        vae_model = load_vae(base, vae_config)
    if base and os.path.isdir(base) and os.path.isfile(os.path.join(base, "scheduler", "scheduler_config.json")):
        scheduler_config = read_json(os.path.join(base, "scheduler", "scheduler_config.json"))
    model = DreamPoseModel(unet, ad, vae_model, clip_model, conv, scheduler_config, info)
    model.check_compatible()
    return model


def convert_authors_checkpoint(unet_path: str, out_path: str, adapter_path: str | None = None,
                               vae_path: str | None = None, unet_config: dict | None = None,
                               vae_config: dict | None = None) -> str:
    """Authors' ``unet_epoch_N.pth`` (+ ``adapter_N.pth``, optional ``vae_N.pth``) → our safetensors."""
    adapter_path = adapter_path or _authors_adapter_beside(unet_path)
    if not adapter_path:
        raise DreamPoseError(f"{unet_path}: no adapter_N.pth beside it; pass the adapter file")
    unet = load_authors_unet(unet_path, unet_config)
    ad = load_authors_adapter(adapter_path)
    vae = load_vae(vae_path, vae_config) if vae_path else None
    return save_bundle(out_path, unet, ad, vae, convention="official", source=os.path.basename(unet_path))
