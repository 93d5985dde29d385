"""Assembling a DreamPose model from the files users have, and converting the authors' files.

``load_dreampose`` resolves every path and checks that the parts fit each other *before* loading
any weights (file headers only), so a wrong file costs a second, not a minute of loading. The
conditioning convention is a property of the checkpoint: ours record it in their metadata, the
authors' files run in ``official`` mode (docs/official-code.md).
"""
from __future__ import annotations

import logging
import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionModel

from ..configs import clean_config, default_scheduler_config, shipped_config
from ..errors import DreamPoseError
from ..files.paths import read_json_config as read_config
from ..files.paths import require_path
from ..files.weights import (AUTHORS_UNET, bundle_has_clip, guess_kind, is_ours, is_safetensors, metadata_json,
                             newest_authors_unet, peek_keys, read_metadata, read_state_dict, split_prefix)
from ..models.bundle import DreamPoseModel, fresh_adapter, save_bundle
from ..models.unet import expand_conv_in, unet_config_with_pose
from ..settings import check_convention
from .components import (check_config_counts, clip_from_state, instantiate, load_adapter_state, load_authors_adapter,
                         load_authors_unet, load_base_unet, load_clip_vision, load_vae, looks_like)
from .subject_file import apply_subject, is_delta_file, read_subject_header

log = logging.getLogger(__name__)


def load_bundle_clip(path: str) -> CLIPVisionModel:
    """The CLIP vision tower embedded in a DreamPose file.

    Args:
        path: one of our ``.safetensors`` files; its ``clip.*`` tensors are loaded strictly, built from the
            ``clip_config`` of its metadata.

    Returns:
        A ``CLIPVisionModel`` in eval mode without gradients, in the file's dtype.
    """
    cfg = metadata_json(read_metadata(path), "clip_config", path)
    if cfg is None:
        raise DreamPoseError(f"{path}: carries no CLIP vision model; give CLIP ViT-B/32 separately")
    return clip_from_state(split_prefix(read_state_dict(path), "clip."), cfg, path)


def _authors_epoch(unet_path: str) -> str | None:
    m = AUTHORS_UNET.match(os.path.basename(unet_path))
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


def load_dreampose_file(path: str, unet_config: dict | None = None, dtype: torch.dtype | None = None):
    """Our format → ``(unet, adapter, vae or None, metadata)``.

    Args:
        path: one of our ``.safetensors`` files (``unet.*``, ``adapter.*``, optional ``vae.*`` tensors).
        unet_config: a UNet config to build from instead of the file's ``unet_config`` (or, without one, the
            shipped ``sd15_unet``); either is widened to the 14 input channels. The VAE is built from the file's
            ``vae_config`` (or the shipped ``sd15_vae``).
        dtype: the floating dtype to load into, tensor by tensor (None: the file's).

    Returns:
        ``(unet, adapter, vae, metadata)``: the networks in eval mode without gradients, in ``dtype`` (or the
        file's);
        ``vae`` is ``None`` when the file has no ``vae.*`` tensors; ``metadata`` is the header's dict of strings.

    Raises:
        DreamPoseError: the file has no DreamPose metadata, or it is a LoRA or VAE-decoder subject finetune (a
            delta that goes on a base model, not a whole model).
    """
    meta = read_metadata(path)
    if not is_ours(meta):
        raise DreamPoseError(f"{path}: a .safetensors file without DreamPose metadata; for the authors' files "
                             "use unet_epoch_N.pth, or convert them with `python -m dreampose convert`")
    _refuse_delta(path, meta)
    ucfg = unet_config_with_pose(unet_config or metadata_json(meta, "unet_config", path) or shipped_config("sd15_unet"))
    vcfg = metadata_json(meta, "vae_config", path) or shipped_config("sd15_vae")
    vcfg = check_config_counts(clean_config(vcfg), "Stable Diffusion VAE", path)
    check_config_counts(ucfg, "DreamPose UNet", path)
    state = read_state_dict(path, prefixes=("unet.", "adapter.", "vae."), dtype=dtype)   # not an embedded CLIP
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
    if clip:
        require_path(clip, "CLIP vision model", hint="Put CLIP ViT-B/32 in models/clip_vision.")
    if dreampose:
        require_path(dreampose, "DreamPose weights", hint="Put them in models/dreampose.")
    if base:
        require_path(base, "Stable Diffusion 1.x model", hint="Put it in models/checkpoints or models/diffusers.")
    if vae:
        require_path(vae, "VAE", hint="Leave it empty to use the base model's VAE.")
    if adapter:
        require_path(adapter, "DreamPose adapter", hint="The authors' adapter_N.pth sits beside unet_epoch_N.pth.")
    if dreampose and os.path.isdir(dreampose):
        raise DreamPoseError(f"{dreampose}: is a folder; give the DreamPose weights file inside it "
                             "(our .safetensors, or the authors' unet_epoch_N.pth)")


def _refuse_delta(path: str, meta: dict) -> None:
    """A LoRA or VAE-decoder subject file holds a delta, not a model: it goes on a base model."""
    if is_delta_file(meta):
        what = "a LoRA subject finetune" if meta.get("mode") == "lora" else "a VAE decoder finetune"
        raise DreamPoseError(f"{path}: is {what}, not a whole DreamPose model; load the base DreamPose weights "
                             f"({meta.get('base_model', 'the ones it was trained on')}) and give this file as the "
                             "subject (load_dreampose(..., subject=...), or --subject)")


def _check_ours(path: str, base, vae) -> None:
    meta = read_metadata(path)
    if not is_ours(meta):
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
    ours = bool(dreampose) and is_safetensors(dreampose)
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
        for path in subjects:
            read_subject_header(path)
    return ours, adapter


def _base_scheduler_config(base: str | None) -> dict | None:
    path = os.path.join(base, "scheduler", "scheduler_config.json") if base and os.path.isdir(base) else None
    return read_config(path) if path and os.path.isfile(path) else None


def _base_config(base: str | None, part: str) -> dict | None:
    """A diffusers base folder's ``unet``/``vae`` config: the shapes the authors' files (which carry no
    config) were trained in when the base is not SD 1.x sized."""
    path = os.path.join(base, part, "config.json") if base and os.path.isdir(base) else None
    return read_config(path) if path and os.path.isfile(path) else None


def _cast_module(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    return module if dtype is None else module.to(dtype)


def load_dreampose(*, clip: str | None = None, dreampose: str | None = None, base: str | None = None,
                   vae: str | None = None,
                   adapter: str | None = None, convention: str | None = None, unet_config: dict | None = None,
                   vae_config: dict | None = None, clip_config: dict | None = None,
                   subject=None, dtype: torch.dtype | None = None) -> DreamPoseModel:
    """Assemble a DreamPose model.

    Every path is checked to exist and to fit its role first, from file headers only, so a wrong file is
    reported before any weights are loaded.

    Args:
        clip: CLIP ViT-B/32 vision model, a folder or one file; may be left out when our file embeds its own CLIP
            (``save_bundle(clip=...)``).
        dreampose: our ``.safetensors`` or the authors' ``unet_epoch_N.pth`` (its ``adapter_N.pth`` is found beside
            it unless ``adapter`` is given); ``None`` builds a fresh model from ``base``.
        base: Stable Diffusion 1.x, a diffusers folder or one ldm ``.safetensors``/``.ckpt``: what a fresh model is
            built from, and where the VAE and the scheduler come from when the DreamPose file has none.
        vae: a VAE file/folder (e.g. the authors' ``vae_N.pth``); otherwise the DreamPose file's own VAE, otherwise
            ``base``'s.
        adapter: the authors' ``adapter_N.pth``, to use instead of the one beside their UNet file.
        convention: ``official`` or ``standard``; ``None`` takes the checkpoint's (ours: its metadata, else
            ``standard``; the authors' → ``official``; a fresh model: ``standard``).
        unet_config: a UNet config to build from instead of the one that comes with the weights (or the shipped
            SD 1.x one).
        vae_config, clip_config: the same for a VAE loaded from ``vae``/``base`` and for ``clip`` (parts embedded in
            our file are built from its metadata).
        subject: one or more saved subject finetunes (full or LoRA UNet+adapter, VAE decoder), applied in order on
            top (:func:`~dreampose.loaders.subject_file.apply_subject`).
        dtype: load the UNet, adapter and VAE straight into this floating dtype, tensor by tensor, so memory
            peaks near the weights' size in it (None: each file's own dtype; ``place`` can convert later).
            CLIP keeps its file's dtype.

    Returns:
        A :class:`~dreampose.models.bundle.DreamPoseModel` whose parts are checked to fit each other. Scheduler: the
        one saved in our file, else ``base``'s ``scheduler/``, else SD 1.x's PNDM.

    Raises:
        DreamPoseError: a path that is missing or given for the wrong input (named in the message), no CLIP, a
            subject that is not a subject file, or parts that do not fit each other.
    """
    subjects = _subject_list(subject)
    if dreampose and os.path.isdir(dreampose):       # the authors' release folder: its newest epoch
        dreampose = newest_authors_unet(dreampose)
        log.info("DreamPose weights: %s (the newest unet_epoch_N.pth of its folder)", dreampose)
    ours, adapter = _resolve(clip, dreampose, base, vae, adapter, convention, subjects)
    info = {"dreampose": dreampose, "base": base, "clip": clip, "vae": vae, "adapter": adapter}
    clip_model = load_clip_vision(clip, clip_config) if clip else load_bundle_clip(dreampose)
    file_vae, file_scheduler = None, None
    if ours:
        unet, ad, file_vae, meta = load_dreampose_file(dreampose, unet_config, dtype)
        conv = convention or meta.get("convention", "standard")
        file_scheduler = metadata_json(meta, "scheduler_config", dreampose)
        info.update({k: meta[k] for k in ("finetuned", "base_model", "subject", "source") if k in meta})
    elif dreampose:      # the authors' files carry no config: the base folder's, else SD 1.x's
        unet = load_authors_unet(dreampose, unet_config or _base_config(base, "unet"), dtype)
        ad = _cast_module(load_authors_adapter(adapter), dtype)
        conv = convention or "official"
    else:
        unet = expand_conv_in(load_base_unet(base, unet_config, dtype), copy=False)   # our own module: no copy
        ad = _cast_module(fresh_adapter(clip_model), dtype)
        conv = convention or "standard"
    check_convention(conv)
    if vae:
        single_file = not os.path.isdir(vae)
        vae_model = load_vae(vae, vae_config or (_base_config(base, "vae") if single_file else None), dtype)
    else:
        vae_model = file_vae if file_vae is not None else load_vae(base, vae_config, dtype)
    scheduler_config = file_scheduler or _base_scheduler_config(base) or default_scheduler_config()
    model = DreamPoseModel(unet, ad, vae_model, clip_model, conv, scheduler_config, info)
    model.check_compatible()
    if subjects:
        for path in subjects:
            model = apply_subject(model, path, inplace=True)
    return model


def convert_authors_checkpoint(unet_path: str, out_path: str, adapter_path: str | None = None,
                               vae_path: str | None = None, unet_config: dict | None = None,
                               vae_config: dict | None = None) -> str:
    """Authors' ``unet_epoch_N.pth`` (+ ``adapter_N.pth``, optional ``vae_N.pth``) → our safetensors.

    Args:
        unet_path: the authors' ``unet_epoch_N.pth``.
        out_path: the ``.safetensors`` file to write (atomically).
        adapter_path: their ``adapter_N.pth``; default: the one of the same epoch beside ``unet_path``.
        vae_path: a VAE file/folder to embed (e.g. their ``vae_N.pth``); default: none, and loading the file then
            needs a VAE or a base model.
        unet_config, vae_config: configs to build from instead of the shipped SD 1.x ones (or a VAE folder's own).

    Returns:
        ``out_path``. The file records ``convention: official`` and the UNet file's name as ``source``.
    """
    require_path(unet_path, "The authors' UNet file (unet_epoch_N.pth)", file=True)
    if adapter_path:
        require_path(adapter_path, "DreamPose adapter", hint="The authors' adapter_N.pth sits beside unet_epoch_N.pth.")
    if vae_path:
        require_path(vae_path, "VAE", hint="Leave it empty to convert without a VAE.")
    adapter_path = adapter_path or _authors_adapter_beside(unet_path)
    if not adapter_path:
        raise _missing_adapter_error(unet_path)
    unet = load_authors_unet(unet_path, unet_config)
    ad = load_authors_adapter(adapter_path)
    vae = load_vae(vae_path, vae_config) if vae_path else None
    return save_bundle(out_path, unet, ad, vae, convention="official", source=os.path.basename(unet_path))
