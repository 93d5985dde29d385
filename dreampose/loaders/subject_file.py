"""Subject finetunes on disk: saving, finding and applying them.

A subject file is our safetensors format (``format: dreampose``) with what was finetuned in its
metadata. Three kinds exist:

* ``finetuned: unet+adapter``, ``mode: full`` — the whole UNet and adapter (``unet.*``,
  ``adapter.*``), also loadable on its own as DreamPose weights.
* ``finetuned: unet+adapter``, ``mode: lora`` — only the LoRA factors of the UNet's attention
  projections (``unet_lora.<module>.lora_A`` ``[r,in]`` / ``.lora_B`` ``[out,r]``, merged as
  ``W + lora_scale·B·A``) plus the whole adapter (``adapter.*``), with the base weights it was
  trained on named (``base_model``) and fingerprinted (``base_fingerprint``), so applying it to
  another base is refused.
* ``finetuned: vae_decoder`` — the VAE decoder only (``vae.decoder.*``).

Every file carries ``cache_key``: a sha256 of everything that decides the training result (photos,
poses, the weights it started from, settings, the algorithm version; computed by
:func:`dreampose.training.finetune.subject_cache_key`), so an identical request finds its file
instead of training again (:func:`find_cached_subject`).
"""
from __future__ import annotations

import os

import torch
from diffusers import UNet2DConditionModel

from .. import __version__
from ..configs import clean_config
from ..errors import DreamPoseError
from ..files.atomic import atomic_save_safetensors
from ..files.paths import require_path
from ..files.weights import (format_metadata, is_ours, is_safetensors, metadata_json, read_metadata, read_state_dict,
                             split_prefix)
from ..models.bundle import adapter_config
from ..models.devices import module_place
from ..models.fingerprint import fingerprints_match, weights_fingerprint
from ..models.lora import LoraDelta, lora_delta_of, merge_lora, remember_lora_delta
from ..settings import check_kind, check_settings
from .components import clone_module, instantiate, load_adapter_state

FINETUNED = {"subject": "unet+adapter", "vae": "vae_decoder"}
LORA_PREFIX = "unet_lora."


# ------------------------------------------------------------------------------------------ saving

def describe_base(model) -> str:
    """A human name for the weights a model came from (file names; 'tiny' for the test model)."""
    info = getattr(model, "info", {}) or {}
    if info.get("finetune", {}).get("base"):
        return info["finetune"]["base"]
    for key in ("base_model", "dreampose", "base"):
        if info.get(key):
            return os.path.basename(str(info[key]).rstrip("/\\")) or str(info[key])
    return "tiny random model" if info.get("tiny") else "unnamed model in memory"


def base_identity(model, kind: str) -> list[float]:
    """The fingerprint of what a finetune of ``kind`` must be applied to: the UNet a UNet+adapter
    finetune started from, the VAE encoder beside a decoder finetune (dtype-independent)."""
    if kind == "vae":
        parts = [model.vae.encoder, getattr(model.vae, "quant_conv", None)]
        return weights_fingerprint(torch.nn.ModuleList([p for p in parts if p is not None]))
    return weights_fingerprint(model.unet)


def save_subject(model, path: str, *, kind: str, settings, cache_key: str, base=None, lora: bool = False,
                 base_fingerprint: list[float] | None = None) -> str:
    """Write ``model``'s finetuned part atomically (temp file, then rename); returns ``path``.

    Args:
        model: the finetuned :class:`~dreampose.models.bundle.DreamPoseModel`.
        path: the file to write, ending in ``.safetensors``.
        kind: ``subject`` (UNet+adapter) or ``vae`` (decoder only, always full).
        settings: the :class:`~dreampose.settings.FinetuneSettings` of the finetune (``None``: the kind's
            defaults), recorded in the metadata.
        cache_key: the finetune's :func:`~dreampose.training.finetune.subject_cache_key`, recorded so that
            :func:`find_cached_subject` finds the file.
        base: the base model's name, or the base DreamPoseModel (named from its files); default: named from
            ``model``'s record (the base its UNet+adapter finetune recorded, else the files it came from).
        lora: with ``kind="subject"``, write only the LoRA delta + adapter, which needs the model to come from a
            LoRA finetune (or a LoRA subject file); ``False`` writes the whole UNet + adapter.

    Returns:
        ``path``.

    Raises:
        DreamPoseError: ``path`` does not end in ``.safetensors`` or is a folder, ``lora`` with ``kind="vae"``, or
            ``lora`` for a model that holds no LoRA delta.
    """
    check_kind(kind)
    settings = check_settings(settings, kind)
    if not str(path).lower().endswith(".safetensors"):
        raise DreamPoseError(f"{path}: a subject finetune is saved as .safetensors; give a file name ending in it")
    if os.path.isdir(path):
        raise DreamPoseError(f"{path} is a folder; give a file name ending in .safetensors")
    base_name = base if isinstance(base, str) else describe_base(base if base is not None else model)
    meta = {"convention": model.convention, "kind": kind, "finetuned": FINETUNED[kind], "steps": settings.steps,
            "lr": settings.lr, "settings": settings.to_dict(), "cache_key": cache_key, "base_model": base_name,
            "created_by": f"dreampose {__version__}"}
    if kind == "vae":
        if lora:
            raise DreamPoseError("the VAE decoder finetune is always full; save it with lora=False")
        tensors = {f"vae.{k}": v for k, v in model.vae.state_dict().items() if k.startswith("decoder.")}
        meta.update(mode="full", vae_config=dict(model.vae.config))
        if base_fingerprint:
            meta.update(base_fingerprint=base_fingerprint)
        return atomic_save_safetensors(tensors, path, format_metadata(**meta))
    meta.update(scheduler_config=dict(model.scheduler_config), adapter_config=adapter_config(model.adapter))
    tensors = {f"adapter.{k}": v for k, v in model.adapter.state_dict().items()}
    if lora:
        delta = lora_delta_of(model)
        if delta is None:
            raise DreamPoseError("this model holds no LoRA delta (it was not made by a LoRA finetune, lora_rank > 0); "
                                 "save it with lora=False to write the whole UNet")
        for name, (a, b) in delta.factors.items():
            tensors[f"{LORA_PREFIX}{name}.lora_A"] = a
            tensors[f"{LORA_PREFIX}{name}.lora_B"] = b
        meta.update(mode="lora", lora_rank=delta.rank, lora_alpha=delta.alpha, lora_scale=delta.scale,
                    base_fingerprint=delta.base_fingerprint, base_weights_sha256=delta.base_digest)
    else:
        tensors.update({f"unet.{k}": v for k, v in model.unet.state_dict().items()})
        meta.update(mode="full", unet_config=dict(model.unet.config))
        if base_fingerprint:
            meta.update(base_fingerprint=base_fingerprint)
    return atomic_save_safetensors(tensors, path, format_metadata(**meta))


def find_cached_subject(folder: str, cache_key: str) -> str | None:
    """A ``.safetensors`` file directly in ``folder`` whose metadata ``cache_key`` matches, else None.

    Only headers are read; unreadable files and temp files of an interrupted save are skipped.

    Args:
        folder: the folder to search (not its subfolders); ``None``, empty or missing finds nothing.
        cache_key: the key to match (:func:`~dreampose.training.finetune.subject_cache_key`); empty finds nothing.

    Returns:
        The path of the first of our files, in name order, whose key matches, or ``None``.
    """
    if not folder or not os.path.isdir(folder) or not cache_key:
        return None
    for name in sorted(os.listdir(folder)):
        if name.startswith(".tmp-") or not name.lower().endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        try:
            meta = read_metadata(path)
        except (DreamPoseError, OSError):
            continue
        if is_ours(meta) and meta.get("cache_key") == cache_key:
            return path
    return None


# ------------------------------------------------------------------------------------------ applying

def read_subject_header(path: str) -> dict:
    """The metadata of a subject file, checked to be one (header only: cheap).

    A plain DreamPose file (from ``convert``, or older; no ``mode`` and no subject ``finetuned`` value) is usable
    as a full UNet+adapter subject: its metadata comes back with ``finetuned: unet+adapter`` and ``mode: full``.

    Returns:
        The header's metadata, a dict of strings.

    Raises:
        DreamPoseError: the file is missing, is not ``.safetensors`` or has no DreamPose metadata.
    """
    require_path(path, "subject finetune", file=True)
    if not is_safetensors(path):
        raise DreamPoseError(f"{path}: a subject finetune is one of our .safetensors files")
    meta = read_metadata(path)
    if not is_ours(meta):
        raise DreamPoseError(f"{path}: not a DreamPose file (no DreamPose metadata); give a file written by a "
                             "subject finetune")
    if meta.get("finetuned") not in ("unet+adapter", "vae_decoder") and meta.get("mode") is None:
        # a plain DreamPose file (convert, or older): usable as a full UNet+adapter subject
        meta = dict(meta, finetuned="unet+adapter", mode="full")
    return meta


def is_delta_file(meta: dict) -> bool:
    """True for subject files that need a base model (LoRA, VAE decoder)."""
    return meta.get("mode") == "lora" or meta.get("finetuned") == "vae_decoder"


def apply_subject(model, path: str, *, inplace: bool = False, check_base: bool = True):
    """``model`` with a saved subject finetune applied; a new model unless ``inplace``.

    Full UNet+adapter files replace both networks; LoRA files merge their delta into (a copy of) the UNet, after
    checking it is the base they were trained on, and replace the adapter; VAE decoder files replace the decoder
    weights (of a copy of the VAE). The finetuned parts keep the dtype and device of the parts they replace. The
    conditioning convention of a UNet+adapter subject must be the model's: training used it.

    Args:
        model: a :class:`~dreampose.models.bundle.DreamPoseModel`.
        path: a subject file (:func:`save_subject`), or a plain DreamPose file (a full UNet+adapter subject).
        inplace: change ``model`` itself instead of a shallow copy; then the LoRA merge and the decoder weights go
            into its own UNet and VAE, not into copies.
        check_base: for a file that records its base's fingerprint (LoRA; full finetunes since they record it),
            refuse a model whose UNet (VAE encoder, for a decoder finetune) does not match it.

    Returns:
        The model with the subject applied (``model`` itself when ``inplace``, else a copy sharing the untouched
        parts); its ``info`` adds ``path`` to ``subjects`` and records what was finetuned.

    Raises:
        DreamPoseError: ``path`` is not a subject file, lacks the weights its kind needs or does not fit the model,
            was finetuned in another convention, or (``check_base``) is a LoRA trained on other weights.
    """
    meta = read_subject_header(path)
    finetuned, mode = meta.get("finetuned"), meta.get("mode")
    info = dict(model.info)
    info["subjects"] = list(info.get("subjects", [])) + [path]
    expected = metadata_json(meta, "base_fingerprint", path, [])
    if check_base and expected and mode == "full":
        kind = "vae" if finetuned == "vae_decoder" else "subject"
        if not fingerprints_match(base_identity(model, kind), expected):
            what = "VAE" if kind == "vae" else "DreamPose UNet"
            raise DreamPoseError(f"{path}: this finetune was trained on another {what} "
                                 f"({meta.get('base_model', 'unknown')!r}) than the model it is applied to; load "
                                 "that base model and apply the finetune to it")
    with torch.inference_mode(False):
        state = read_state_dict(path, "subject finetune")
        if finetuned == "vae_decoder":
            decoder = split_prefix(state, "vae.decoder.")
            if not decoder:
                raise DreamPoseError(f"{path}: says it holds a VAE decoder but has no vae.decoder.* weights")
            device, dtype = module_place(model.vae)
            vae = model.vae if inplace else clone_module(model.vae, device, dtype)
            current = vae.decoder.state_dict()
            bad = sorted(set(current) ^ set(decoder)) or [k for k in current if current[k].shape != decoder[k].shape]
            if bad:
                raise DreamPoseError(f"{path}: its VAE decoder does not fit this model's VAE (e.g. {bad[0]!r}); it was "
                                     "trained on another VAE")
            vae.decoder.load_state_dict({k: decoder[k].to(device=current[k].device, dtype=current[k].dtype)
                                         for k in current}, strict=True, assign=True)
            vae.decoder.requires_grad_(False)
            info.update(finetuned_vae="vae_decoder", vae_subject=path)
            changes = {"vae": vae, "info": info}
        else:
            conv = meta.get("convention")
            if conv and conv != model.convention:
                raise DreamPoseError(
                    f"{path}: was finetuned in the {conv!r} conditioning convention, the model runs in "
                    f"{model.convention!r}; load the base with convention={conv!r} (training and inference must "
                    "use the same one)")
            adapter_state = split_prefix(state, "adapter.")
            if not adapter_state:
                raise DreamPoseError(f"{path}: a UNet+adapter subject without adapter weights")
            ad_device, ad_dtype = module_place(model.adapter)
            adapter = load_adapter_state(adapter_state, path)
            torch.nn.Module.to(adapter, device=ad_device, dtype=ad_dtype)
            device, dtype = module_place(model.unet)
            if mode == "lora":
                unet = _apply_lora(model, state, meta, path, inplace=inplace, check_base=check_base)
            else:
                unet_state = split_prefix(state, "unet.")
                if not unet_state:
                    raise DreamPoseError(f"{path}: a full UNet+adapter subject without UNet weights")
                config = clean_config(model.unet.config)
                unet = instantiate(lambda: UNet2DConditionModel.from_config(config), unet_state,
                                   "14-channel DreamPose UNet", path)
                torch.nn.Module.to(unet, device=device, dtype=dtype)
            info.update(finetuned="unet+adapter", subject=path, base_model=meta.get("base_model", ""))
            changes = {"unet": unet, "adapter": adapter, "info": info}
    if inplace:
        for k, v in changes.items():
            setattr(model, k, v)
        return model
    return model.shallow_copy(**changes)


def _apply_lora(model, state: dict, meta: dict, path: str, *, inplace: bool, check_base: bool):
    lora = split_prefix(state, LORA_PREFIX)
    names = sorted({k.rsplit(".", 1)[0] for k in lora})
    try:
        factors = {n: (lora[f"{n}.lora_A"].float(), lora[f"{n}.lora_B"].float()) for n in names}
        rank, alpha = int(meta["lora_rank"]), float(meta["lora_alpha"])
    except (KeyError, ValueError) as exc:
        raise DreamPoseError(f"{path}: a damaged LoRA subject file ({exc})") from exc
    if not factors:
        raise DreamPoseError(f"{path}: a LoRA subject file without LoRA weights")
    expected = metadata_json(meta, "base_fingerprint", path, [])
    delta = LoraDelta(factors, rank, alpha, expected, meta.get("base_weights_sha256", ""))
    if check_base and expected and not fingerprints_match(weights_fingerprint(model.unet), expected):
        raise DreamPoseError(
            f"{path}: this LoRA was trained on other DreamPose weights ({meta.get('base_model', 'unknown')!r}) than "
            "the model it is applied to; load that base model and apply the LoRA to it")
    device, dtype = module_place(model.unet)
    unet = model.unet if inplace else clone_module(model.unet, device, dtype)
    merge_lora(unet, delta, path)
    remember_lora_delta(unet, delta)
    return unet
