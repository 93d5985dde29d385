"""Subject finetunes on disk: cache keys, saving, finding and applying them.

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
poses, the weights it started from, settings, the algorithm version), so an identical request
finds its file instead of training again (:func:`find_cached_subject`).

Weights are identified cheaply: a strided sample of at most 4096 values of every tensor, with its
name, shape and dtype (finetuning changes essentially every value, so samples see it).
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from .. import __version__
from ..models.adapter import EmbeddingAdapter
from ..files.weights import atomic_save_safetensors, format_metadata, read_metadata, read_state_dict, split_prefix
from ..errors import DreamPoseError
from .components import instantiate

KINDS = ("subject", "vae")
FINETUNED = {"subject": "unet+adapter", "vae": "vae_decoder"}
SAMPLE_PER_TENSOR = 4096
FINGERPRINT_TENSORS = 64
FINGERPRINT_RTOL = 1e-2
LORA_PREFIX = "unet_lora."


# ------------------------------------------------------------------------------------------ identity

def _strided_sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE_PER_TENSOR)
    return flat[::stride][:SAMPLE_PER_TENSOR].cpu().contiguous()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(*modules: nn.Module) -> str:
    """sha256 over names, shapes, dtypes and a strided sample of every tensor of ``modules`` (in order)."""
    h = hashlib.sha256()
    with torch.inference_mode(False):
        for i, module in enumerate(modules):
            for name, t in sorted(module.state_dict().items()):
                h.update(f"{i}:{name}:{tuple(t.shape)}:{t.dtype}|".encode())
                h.update(_tensor_bytes(_strided_sample(t)))
    return h.hexdigest()


def weights_fingerprint(module: nn.Module, count: int = FINGERPRINT_TENSORS) -> list[float]:
    """Mean |value| of a strided sample of ``count`` evenly spread tensors: equal, within rounding,
    for the same weights in fp32, fp16 or bf16, and far apart for other weights."""
    items = [(n, t) for n, t in sorted(module.state_dict().items()) if t.is_floating_point() and t.numel() > 1]
    if not items:
        return []
    picks = sorted({round(i * (len(items) - 1) / max(count - 1, 1)) for i in range(min(count, len(items)))})
    with torch.inference_mode(False):
        return [float(_strided_sample(items[i][1]).float().abs().mean()) for i in picks]


def fingerprints_match(a, b, rtol: float = FINGERPRINT_RTOL) -> bool:
    if len(a) != len(b) or not a:
        return False
    return all(abs(x - y) <= rtol * max(abs(x), abs(y)) + 1e-7 for x, y in zip(a, b))


def subject_cache_key(model, images, uv, settings, kind: str) -> str:
    """sha256 of photos, poses, the weights the finetune starts from and uses, convention, schedule,
    settings (all but ``gradient_checkpointing``, which recomputes the same numbers) and the
    algorithm version.

    ``kind``: ``subject`` (UNet+adapter: hashes UNet, adapter, VAE and CLIP, all of which take part)
    or ``vae`` (decoder: hashes the VAE only; ``uv`` is ignored).
    """
    from ..training.finetune import ALGORITHM_VERSION, _image_list, _pose_list, check_settings

    check_kind(kind)
    settings = check_settings(settings, kind)
    h = hashlib.sha256()
    header = {"algorithm": ALGORITHM_VERSION, "kind": kind, "settings": settings.cache_fields()}
    if kind == "subject":
        header.update(convention=model.convention, scheduler=dict(model.scheduler_config))
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    if kind == "subject":
        h.update(weights_digest(model.unet, model.adapter, model.vae, model.clip).encode())
    else:
        h.update(weights_digest(model.vae).encode())
    with torch.inference_mode(False):
        # canonical form (one float32 0..1 tensor per photo, one float32 UV map per pose), so a batch
        # tensor and a list of the same photos (a node and the command line) give the same key
        photos = _image_list(images)
        for t in photos:
            h.update(f"image{tuple(t.shape)}|".encode() + _tensor_bytes(t))
        if kind == "subject":
            if uv is None:
                raise DreamPoseError("a subject finetune's cache key needs the poses")
            for t in _pose_list(uv, len(photos)):
                h.update(f"pose{tuple(t.shape)}|".encode() + _tensor_bytes(t))
    return h.hexdigest()


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise DreamPoseError(f"unknown finetune kind {kind!r}; use 'subject' (UNet+adapter) or 'vae' (VAE decoder)")
    return kind


# ------------------------------------------------------------------------------------------ cloning

def _builder(module: nn.Module):
    if isinstance(module, EmbeddingAdapter):
        return lambda: EmbeddingAdapter(module.clip_width, module.clip_tokens, module.vae_tokens, module.vae_features)
    if isinstance(module, (UNet2DConditionModel, AutoencoderKL)):
        config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
        return lambda: type(module).from_config(config)
    raise TypeError(f"cannot clone a {type(module).__name__}")


def clone_module(module: nn.Module, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy with its own storage (ordinary tensors, even from inference-mode ones), built without
    random init, on ``device`` in ``dtype`` (floating tensors only); eval mode, no grad."""
    with torch.inference_mode(False):
        state = {}
        for k, v in module.state_dict().items():
            want = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
            state[k] = v.detach().to(device=device if device is not None else v.device, dtype=want, copy=True)
        return instantiate(_builder(module), state, type(module).__name__, "a model in memory")


def module_place(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


# ------------------------------------------------------------------------------------------ LoRA delta

@dataclass
class LoraDelta:
    """LoRA factors per Linear of the UNet: ``W ← W + scale·B·A`` (A ``[r,in]``, B ``[out,r]``, fp32, CPU)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    base_fingerprint: list[float]
    base_digest: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# The delta a LoRA finetune merged into a UNet, keyed by that UNet object (weakly: it goes with it).
_LORA_DELTAS: "weakref.WeakKeyDictionary[nn.Module, LoraDelta]" = weakref.WeakKeyDictionary()


def lora_delta_of(model) -> LoraDelta | None:
    """The LoRA delta merged into ``model.unet`` by a LoRA finetune or a LoRA subject file, if any."""
    return _LORA_DELTAS.get(model.unet)


def remember_lora_delta(unet: nn.Module, delta: LoraDelta) -> None:
    _LORA_DELTAS[unet] = delta


def merge_lora(unet: nn.Module, delta: LoraDelta, source: str = "LoRA delta") -> nn.Module:
    """Add ``scale·B·A`` to each named Linear's weight (computed in fp32, stored in its dtype)."""
    modules = dict(unet.named_modules())
    with torch.inference_mode(False), torch.no_grad():
        for name, (a, b) in delta.factors.items():
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                raise DreamPoseError(f"{source}: the UNet has no linear layer {name!r}; the LoRA was trained on "
                                     "another architecture")
            w = layer.weight
            if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
                raise DreamPoseError(f"{source}: LoRA factors for {name!r} are {tuple(b.shape)}·{tuple(a.shape)}, the "
                                     f"layer is {tuple(w.shape)}")
            update = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
            # a new Parameter rather than an in-place add: the old one may be an inference-mode tensor
            layer.weight = nn.Parameter((w.float() + delta.scale * update).to(w.dtype), requires_grad=False)
    return unet


# ------------------------------------------------------------------------------------------ saving

def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def _json_meta(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=_jsonable))


def describe_base(model) -> str:
    """A human name for the weights a model came from (file names; 'tiny' for the test model)."""
    info = getattr(model, "info", {}) or {}
    if info.get("finetune", {}).get("base"):
        return info["finetune"]["base"]
    for key in ("base_model", "dreampose", "base"):
        if info.get(key):
            return os.path.basename(str(info[key]).rstrip("/\\")) or str(info[key])
    return "tiny random model" if info.get("tiny") else "unnamed model in memory"


def save_subject(model, path: str, *, kind: str, settings, cache_key: str, base=None, lora: bool = False) -> str:
    """Write ``model``'s finetuned part atomically (temp file, then rename); returns ``path``.

    ``kind``: ``subject`` (UNet+adapter; ``lora=True`` writes only the LoRA delta + adapter, which
    needs the model to come from a LoRA finetune) or ``vae`` (decoder only). ``base``: the base
    model's name, or the base DreamPoseModel (named from its files); default: what the finetune
    recorded.
    """
    from ..training.finetune import check_settings

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
        return atomic_save_safetensors(tensors, path, _json_meta(format_metadata(**meta)))
    adapter_config = {"clip_width": model.adapter.clip_width, "clip_tokens": model.adapter.clip_tokens,
                      "vae_tokens": model.adapter.vae_tokens, "vae_features": model.adapter.vae_features}
    meta.update(scheduler_config=dict(model.scheduler_config), adapter_config=adapter_config)
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
    return atomic_save_safetensors(tensors, path, _json_meta(format_metadata(**meta)))


def find_cached_subject(folder: str, cache_key: str) -> str | None:
    """A ``.safetensors`` file directly in ``folder`` whose metadata ``cache_key`` matches, else None.

    Only headers are read; unreadable files and temp files of an interrupted save are skipped.
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
        if meta.get("format") == "dreampose" and meta.get("cache_key") == cache_key:
            return path
    return None


# ------------------------------------------------------------------------------------------ applying

def _meta_json(meta: dict, key: str, path: str, default=None):
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except ValueError as exc:
        raise DreamPoseError(f"{path}: damaged metadata field {key!r} ({exc})") from exc


def read_subject_header(path: str) -> dict:
    """The metadata of a subject file, checked to be one (header only: cheap)."""
    if not path or not os.path.isfile(path):
        raise DreamPoseError(f"subject finetune not found: {path!r}")
    if not path.lower().endswith((".safetensors", ".sft")):
        raise DreamPoseError(f"{path}: a subject finetune is one of our .safetensors files")
    meta = read_metadata(path)
    if meta.get("format") != "dreampose":
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

    Full UNet+adapter files replace both networks; LoRA files merge their delta into (a copy of) the
    UNet, after checking it is the base they were trained on (``check_base``), and replace the
    adapter; VAE decoder files replace the decoder weights (of a copy of the VAE). The finetuned
    parts keep the dtype and device of the parts they replace. The conditioning convention of a
    UNet+adapter subject must be the model's: training used it.
    """
    meta = read_subject_header(path)
    finetuned, mode = meta.get("finetuned"), meta.get("mode")
    info = dict(model.info)
    info["subjects"] = list(info.get("subjects", [])) + [path]
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
            from .components import load_adapter_state

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
                config = {k: v for k, v in dict(model.unet.config).items() if not k.startswith("_")}
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
    expected = _meta_json(meta, "base_fingerprint", path, [])
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
