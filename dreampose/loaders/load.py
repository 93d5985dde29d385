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

from ..models.adapter import EmbeddingAdapter
from ..files.weights import (atomic_save_safetensors, format_metadata, guess_kind, peek_keys, read_metadata,
                          read_state_dict, require_file, split_prefix)
from ..pipeline.conditioning import check_convention
from ..errors import DreamPoseError
from .components import (clip_from_state, instantiate, load_adapter_state, load_authors_adapter, load_authors_unet,
                      load_base_unet, load_clip_vision, load_vae, looks_like, normalise_clip_keys, read_config,
                      shipped_config)
from ..pipeline.sampling import default_scheduler_config
from ..models.unet import UNET_IN_CHANNELS, expand_conv_in, unet_config_with_pose

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
        """Move in place (networks are large: no copies) and return self; ``None`` keeps a dtype.

        Uses ``nn.Module.to`` directly: diffusers' override logs a warning whenever ``dtype=`` is given.
        """
        for module, dtype in ((self.unet, unet_dtype), (self.adapter, unet_dtype),
                              (self.vae, vae_dtype), (self.clip, clip_dtype)):
            torch.nn.Module.to(module, *(a for a in (device, dtype) if a is not None))
        return self

    def shallow_copy(self, **changes) -> "DreamPoseModel":
        return replace(self, **changes)

    def save(self, path: str, include_vae: bool = False, **meta) -> str:
        """Our safetensors format: ``unet.*`` ``adapter.*`` (``vae.*``), configs and convention in metadata."""
        return save_bundle(path, self.unet, self.adapter, self.vae if include_vae else None,
                           convention=self.convention, scheduler_config=self.scheduler_config, **meta)


def save_bundle(path: str, unet, adapter: EmbeddingAdapter, vae=None, clip=None, dtype: torch.dtype | None = None,
                **meta) -> str:
    """Write networks in our format atomically; their configs go into the metadata.

    ``clip`` embeds the CLIP vision tower too (a self-contained file, e.g. the shipped demo model);
    ``dtype`` stores floating tensors in that dtype (fp16 halves the file).
    """
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"adapter.{k}": v for k, v in adapter.state_dict().items()})
    configs = {"unet_config": dict(unet.config),
               "adapter_config": {"clip_width": adapter.clip_width, "clip_tokens": adapter.clip_tokens,
                                  "vae_tokens": adapter.vae_tokens, "vae_features": adapter.vae_features}}
    if vae is not None:
        tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
        configs["vae_config"] = dict(vae.config)
    if clip is not None:
        tensors.update({f"clip.{k}": v for k, v in normalise_clip_keys(clip.state_dict()).items()})
        configs["clip_config"] = {k: v for k, v in clip.config.to_dict().items()
                                  if k in _CLIP_CONFIG_KEYS}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = format_metadata(**configs, **meta)
    return atomic_save_safetensors(tensors, path, json.loads(json.dumps(metadata, default=_jsonable)))


_CLIP_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                     "patch_size", "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")


def bundle_has_clip(path: str | None) -> bool:
    """Whether a DreamPose file carries its own CLIP vision tower (then no separate CLIP is needed)."""
    if not path or os.path.isdir(path) or not path.lower().endswith((".safetensors", ".sft")) \
            or not os.path.isfile(path):
        return False
    return "clip_config" in read_metadata(path)


def load_bundle_clip(path: str) -> CLIPVisionModel:
    """The CLIP vision tower embedded in a DreamPose file."""
    meta = read_metadata(path)
    cfg = _meta_json(meta, "clip_config", path)
    if cfg is None:
        raise DreamPoseError(f"{path}: carries no CLIP vision model; give CLIP ViT-B/32 separately")
    return clip_from_state(split_prefix(read_state_dict(path), "clip."), cfg, path)


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


def _authors_epoch(unet_path: str) -> str | None:
    m = _AUTHORS_UNET.match(os.path.basename(unet_path))
    return m.group(1) if m else None


def _authors_adapter_beside(unet_path: str) -> str | None:
    epoch = _authors_epoch(unet_path)
    if epoch is None:
        return None
    candidate = os.path.join(os.path.dirname(unet_path), f"adapter_{epoch}.pth")
    return candidate if os.path.isfile(candidate) else None


def _missing_adapter_error(unet_path: str) -> DreamPoseError:
    epoch = _authors_epoch(unet_path)
    if epoch is None:
        return DreamPoseError(
            f"{unet_path}: not a DreamPose file. Give our .safetensors, or the authors' unet_epoch_N.pth with its "
            "adapter_N.pth beside it (or the adapter file explicitly)")
    expected = os.path.join(os.path.dirname(unet_path), f"adapter_{epoch}.pth")
    return DreamPoseError(f"{unet_path}: the authors' UNet needs its adapter, expected at {expected!r}; put it "
                          "there or give the adapter file explicitly")


def _check_exists(path: str | None, what: str, hint: str) -> None:
    if path and not os.path.exists(path):
        raise DreamPoseError(f"{what} not found: {path!r}. {hint}")


# What each input of load_dreampose may be, by guess_kind of its tensor names.
_ROLE_KINDS = {
    "DreamPose weights": ("unet",), "DreamPose adapter": ("adapter",), "CLIP vision model": ("clip",),
    "VAE": ("vae", "sd_checkpoint"), "Stable Diffusion 1.x model": ("sd_checkpoint",),
}


def _check_role(path: str | None, role: str) -> None:
    """Refuse a file given for the wrong input from its tensor names alone (header/zip index, no weights).

    Folders are checked by their loaders; legacy pickles that cannot be peeked at lazily are too.
    """
    if not path or os.path.isdir(path):
        return
    keys = peek_keys(path)
    if keys is None or guess_kind(keys) in _ROLE_KINDS[role]:
        return
    raise DreamPoseError(f"{path}: given as the {role}, but it looks like {looks_like(keys)}")


def _meta_json(meta: dict, key: str, source: str):
    """A JSON field of our metadata, or None when absent."""
    try:
        return json.loads(meta[key]) if key in meta else None
    except ValueError as exc:
        raise DreamPoseError(f"{source}: damaged metadata field {key!r} ({exc})") from exc


def load_dreampose_file(path: str, unet_config: dict | None = None):
    """Our format → (unet, adapter, vae or None, metadata)."""
    meta = read_metadata(path)
    if meta.get("format") != "dreampose":
        raise DreamPoseError(f"{path}: a .safetensors file without DreamPose metadata; for the authors' files "
                             "use unet_epoch_N.pth, or convert them with `python -m dreampose convert`")
    _refuse_delta(path, meta)
    ucfg = unet_config_with_pose(unet_config or _meta_json(meta, "unet_config", path) or shipped_config("sd15_unet"))
    vcfg = _meta_json(meta, "vae_config", path) or shipped_config("sd15_vae")
    vcfg = {k: v for k, v in vcfg.items() if not k.startswith("_")}
    state = read_state_dict(path)
    unet = instantiate(lambda: UNet2DConditionModel.from_config(ucfg), split_prefix(state, "unet."),
                       "14-channel DreamPose UNet", path)
    adapter = load_adapter_state(split_prefix(state, "adapter."), path)
    vae_state = split_prefix(state, "vae.")
    vae = instantiate(lambda: AutoencoderKL.from_config(vcfg), vae_state, "Stable Diffusion VAE", path) \
        if vae_state else None
    return unet, adapter, vae, meta


def _check_paths(clip, dreampose, base, vae, adapter) -> None:
    """Every given path exists (and CLIP is given): a typo is reported before anything is read."""
    if not clip and not bundle_has_clip(dreampose):
        raise DreamPoseError("no CLIP vision model given: DreamPose needs CLIP ViT-B/32 (models/clip_vision)")
    _check_exists(clip, "CLIP vision model", "Put CLIP ViT-B/32 in models/clip_vision.")
    _check_exists(dreampose, "DreamPose weights", "Put them in models/dreampose.")
    _check_exists(base, "Stable Diffusion 1.x model", "Put it in models/checkpoints or models/diffusers.")
    _check_exists(vae, "VAE", "Leave it empty to use the base model's VAE.")
    _check_exists(adapter, "DreamPose adapter", "The authors' adapter_N.pth sits beside unet_epoch_N.pth.")
    if dreampose and os.path.isdir(dreampose):
        raise DreamPoseError(f"{dreampose}: is a folder; give the DreamPose weights file inside it "
                             "(our .safetensors, or the authors' unet_epoch_N.pth)")


def _refuse_delta(path: str, meta: dict) -> None:
    """A LoRA or VAE-decoder subject file holds a delta, not a model: it goes on a base model."""
    if meta.get("mode") == "lora" or meta.get("finetuned") == "vae_decoder":
        what = "a LoRA subject finetune" if meta.get("mode") == "lora" else "a VAE decoder finetune"
        raise DreamPoseError(f"{path}: is {what}, not a whole DreamPose model; load the base DreamPose weights "
                             f"({meta.get('base_model', 'the ones it was trained on')}) and give this file as the "
                             "subject (load_dreampose(..., subject=...), or --subject)")


def _check_ours(path: str, base, vae) -> None:
    meta = read_metadata(path)
    if meta.get("format") != "dreampose":
        raise DreamPoseError(f"{path}: this .safetensors has no DreamPose metadata; it looks like "
                             f"{looks_like(peek_keys(path))}")
    _refuse_delta(path, meta)
    if "vae_config" not in meta and not vae and not base:
        raise DreamPoseError(f"{path} has no VAE: also give the Stable Diffusion 1.x base model or a VAE")


def _check_authors(path: str, adapter: str | None, base, vae) -> str:
    """The authors' UNet file and its adapter (found beside it by epoch number unless given)."""
    _check_role(path, "DreamPose weights")
    adapter = adapter or _authors_adapter_beside(path)
    if not adapter:
        raise _missing_adapter_error(path)
    _check_role(adapter, "DreamPose adapter")
    if not vae and not base:
        raise DreamPoseError("the authors' UNet file has no VAE: give their vae_N.pth or the Stable Diffusion "
                             "1.x base model")
    return adapter


def _subject_list(subject) -> list[str]:
    if not subject:
        return []
    return [os.fspath(subject)] if isinstance(subject, (str, os.PathLike)) else [os.fspath(s) for s in subject]


def _resolve(clip, dreampose, base, vae, adapter, convention, subjects=()) -> tuple[bool, str | None]:
    """Step 1 of load_dreampose: every path exists and fits its role, or a DreamPoseError naming it.

    Reads headers only (safetensors JSON, the index of a zip pickle), so a wrong file costs
    milliseconds instead of loading the other models first. Returns (our format?, adapter path).
    """
    _check_paths(clip, dreampose, base, vae, adapter)
    if convention is not None:
        check_convention(convention)
    ours = bool(dreampose) and dreampose.lower().endswith((".safetensors", ".sft"))
    if ours:
        _check_ours(dreampose, base, vae)
    elif dreampose:
        adapter = _check_authors(dreampose, adapter, base, vae)
    elif not base:
        raise DreamPoseError("give DreamPose weights, or a Stable Diffusion 1.x base model to build a fresh one")
    _check_role(clip, "CLIP vision model")
    _check_role(vae, "VAE")
    _check_role(base, "Stable Diffusion 1.x model")
    if subjects:
        from .subject_file import read_subject_header

        for path in subjects:
            read_subject_header(path)
    return ours, adapter


def _base_scheduler_config(base: str | None) -> dict | None:
    path = os.path.join(base, "scheduler", "scheduler_config.json") if base and os.path.isdir(base) else None
    return read_config(path) if path and os.path.isfile(path) else None


def load_dreampose(*, clip: str | None = None, dreampose: str | None = None, base: str | None = None, vae: str | None = None,
                   adapter: str | None = None, convention: str | None = None, unet_config: dict | None = None,
                   vae_config: dict | None = None, clip_config: dict | None = None,
                   subject=None) -> DreamPoseModel:
    """Assemble a DreamPose model.

    ``dreampose``: our ``.safetensors`` or the authors' ``unet_epoch_N.pth`` (its ``adapter_N.pth``
    is found beside it unless ``adapter`` is given); ``None`` builds a fresh model from ``base``.
    ``vae``: a VAE file/folder (e.g. the authors' ``vae_N.pth``); otherwise the DreamPose file's own
    VAE, otherwise ``base``'s. ``convention``: ``None`` takes the checkpoint's (authors' → official).
    Scheduler: the one saved in our file, else ``base``'s ``scheduler/``, else SD 1.x's PNDM.
    ``clip``: may be left out when our file embeds its own CLIP (``save_bundle(clip=...)``).
    ``subject``: one or more saved subject finetunes (full or LoRA UNet+adapter, VAE decoder),
    applied in order on top (``finetune.apply_subject``).
    """
    subjects = _subject_list(subject)
    ours, adapter = _resolve(clip, dreampose, base, vae, adapter, convention, subjects)
    info = {"dreampose": dreampose, "base": base, "clip": clip, "vae": vae, "adapter": adapter}
    clip_model = load_clip_vision(clip, clip_config) if clip else load_bundle_clip(dreampose)
    file_vae, file_scheduler = None, None
    if ours:
        unet, ad, file_vae, meta = load_dreampose_file(dreampose, unet_config)
        conv = convention or meta.get("convention", "standard")
        file_scheduler = _meta_json(meta, "scheduler_config", dreampose)
        info.update({k: meta[k] for k in ("finetuned", "base_model", "subject", "source") if k in meta})
    elif dreampose:
        unet = load_authors_unet(dreampose, unet_config)
        ad = load_authors_adapter(adapter)
        conv = convention or "official"
    else:
        unet = expand_conv_in(load_base_unet(base, unet_config))
        ad = fresh_adapter(clip_model)
        conv = convention or "standard"
    check_convention(conv)
    if vae:
        vae_model = load_vae(vae, vae_config)
    else:
        vae_model = file_vae if file_vae is not None else load_vae(base, vae_config)
    scheduler_config = file_scheduler or _base_scheduler_config(base) or default_scheduler_config()
    model = DreamPoseModel(unet, ad, vae_model, clip_model, conv, scheduler_config, info)
    model.check_compatible()
    if subjects:
        from .subject_file import apply_subject

        for path in subjects:
            model = apply_subject(model, path, inplace=True)
    return model


def convert_authors_checkpoint(unet_path: str, out_path: str, adapter_path: str | None = None,
                               vae_path: str | None = None, unet_config: dict | None = None,
                               vae_config: dict | None = None) -> str:
    """Authors' ``unet_epoch_N.pth`` (+ ``adapter_N.pth``, optional ``vae_N.pth``) → our safetensors."""
    require_file(unet_path, "The authors' UNet file (unet_epoch_N.pth)")
    _check_exists(adapter_path, "DreamPose adapter", "The authors' adapter_N.pth sits beside unet_epoch_N.pth.")
    _check_exists(vae_path, "VAE", "Leave it empty to convert without a VAE.")
    adapter_path = adapter_path or _authors_adapter_beside(unet_path)
    if not adapter_path:
        raise _missing_adapter_error(unet_path)
    unet = load_authors_unet(unet_path, unet_config)
    ad = load_authors_adapter(adapter_path)
    vae = load_vae(vae_path, vae_config) if vae_path else None
    return save_bundle(out_path, unet, ad, vae, convention="official", source=os.path.basename(unet_path))
