"""Devices and dtypes the ComfyUI way: ask ``comfy.model_management``, and hand the networks to it.

Each DreamPose network (UNet, adapter, VAE, CLIP) gets one ``comfy.model_patcher.ModelPatcher``
(load device = ComfyUI's torch device, offload device = its UNet offload device). The nodes load
them with ``mm.load_models_gpu`` like core models, so they show up in ``current_loaded_models``,
stay loaded between runs while there is room, and are offloaded whenever the host needs the memory
(another model, ``unload_all_models``, ``free_memory``). No private cache pins VRAM.

The networks are diffusers/transformers modules whose ``device`` is a read-only property, so each
is wrapped in a tiny ``nn.Module`` holder the patcher may write ``device`` on. They are always
loaded whole (``force_full_load``): plain modules have no ComfyUI cast-weights ops to run
partially offloaded, so a partial unload request unloads them completely instead.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import comfy.model_management as mm
import comfy.model_patcher
from comfy.cli_args import args

from ..dreampose.models.devices import dtype_from_name

def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_dtype(choice: str, device: torch.device, params: int) -> torch.dtype:
    """``auto``: the CLI's --fp16/bf16/fp32-unet if given, else fp16 → bf16 → fp32, whichever
    ComfyUI says the device computes well (no manual-cast fallbacks: diffusers computes in the
    weights' dtype)."""
    if choice != "auto":
        return dtype_from_name(choice)
    if args.fp32_unet:
        return torch.float32
    if args.bf16_unet:
        return torch.bfloat16
    if args.fp16_unet:
        return torch.float16
    if mm.should_use_fp16(device, model_params=params):
        return torch.float16
    if mm.should_use_bf16(device, model_params=params):
        return torch.bfloat16
    return torch.float32


def vae_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto`` is never fp16: the SD VAE overflows to NaN/black frames in fp16."""
    if choice != "auto":
        return dtype_from_name(choice)
    dtype = mm.vae_dtype(device, allowed_dtypes=[torch.bfloat16])
    if dtype == torch.float16:  # only when forced by --fp16-vae
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    return dtype


def working_memory(batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Rough activation memory of an SD 1.x UNet call (same order as core's SD15 estimate) plus
    ComfyUI's inference reserve."""
    latent_area = batch * (height // 8) * (width // 8)
    return int(latent_area * mm.dtype_size(dtype) * 0.01 * 1024 * 1024 + mm.minimum_inference_memory())


class NetworkHolder(torch.nn.Module):
    """The module a patcher manages: the network as its only child, plus a writable ``device``."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        super().__init__()
        self.net = net
        self.device = device


class DreamPosePatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for a plain network: no weight patches, always loaded whole."""

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return 0  # model_unload then detaches the whole network (no lowvram ops to fall back on)

    @property
    def network(self) -> torch.nn.Module:
        return self.model.net


_PATCHER_ATTR = "_dreampose_patcher"


def _first_param(module: torch.nn.Module) -> torch.Tensor | None:
    return next(module.parameters(), None)


def patcher_for(module: torch.nn.Module, owner=None) -> DreamPosePatcher:
    """The one patcher of ``module`` (created on first use). The network keeps only a weak reference
    to it (no cycle); ``owner`` (the DREAMPOSE_MODEL) keeps it alive for as long as it lives."""
    ref = module.__dict__.get(_PATCHER_ATTR)
    patcher = ref() if ref is not None else None
    if patcher is None or patcher.network is not module:  # none yet, or a deepcopy's stale reference
        param = _first_param(module)
        current = param.device if param is not None else mm.unet_offload_device()
        patcher = DreamPosePatcher(NetworkHolder(module, current), load_device=mm.get_torch_device(),
                                   offload_device=mm.unet_offload_device())
        object.__setattr__(module, _PATCHER_ATTR, weakref.ref(patcher))
    if owner is not None:
        keep = owner.__dict__.setdefault("_dreampose_patchers", [])
        if not any(p is patcher for p in keep):
            keep.append(patcher)
    return patcher


def _loaded_entries(patcher) -> list:
    return [lm for lm in mm.current_loaded_models if lm.model is patcher]


def release(module: torch.nn.Module) -> None:
    """Let ComfyUI unload ``module`` if it holds it loaded (back to the offload device)."""
    ref = module.__dict__.get(_PATCHER_ATTR)
    patcher = ref() if ref is not None else None
    if patcher is None or patcher.network is not module:
        return
    for lm in _loaded_entries(patcher):
        lm.model_unload()
        mm.current_loaded_models.remove(lm)


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move/cast in place. ComfyUI lets go of the module first if it holds it loaded, so its
    bookkeeping never disagrees with where the weights are. ``torch.nn.Module.to`` directly:
    diffusers' override logs a keep-in-fp32 warning on every call that names a dtype."""
    release(module)
    torch.nn.Module.to(module, device=device, dtype=dtype)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    param = _first_param(module)
    if param is not None and param.dtype != dtype:
        torch.nn.Module.to(module, dtype=dtype)  # on whatever device it is; the patcher's size changes
        ref = module.__dict__.get(_PATCHER_ATTR)
        if ref is not None and ref() is not None:
            ref().size = 0


@contextmanager
def borrowed(modules: list[tuple[torch.nn.Module, torch.dtype]], extra_memory: int = 0, owner=None):
    """Have ComfyUI load ``modules`` (in their dtypes) on its torch device for the block, with
    ``extra_memory`` bytes of working memory, evicting other models as it sees fit. They stay
    registered as loaded afterwards, and are offloaded when the host needs the room."""
    patchers = []
    for module, dtype in modules:
        _cast(module, dtype)
        patchers.append(patcher_for(module, owner))
    mm.load_models_gpu(patchers, memory_required=extra_memory, force_full_load=True)
    try:
        yield mm.get_torch_device()
    finally:
        mm.soft_empty_cache()


def park(model, dtypes: tuple[torch.dtype, torch.dtype, torch.dtype] | None = None) -> None:
    """Every network of ``model`` on the offload device, in ``dtypes`` (UNet/adapter, VAE, CLIP; default:
    the loader's). The ModelPatchers move them to the compute device when a node needs them."""
    unet_dt, vae_dt, clip_dt = dtypes or model_dtypes(model)
    offload = mm.unet_offload_device()
    for module, dt in ((model.unet, unet_dt), (model.adapter, unet_dt), (model.vae, vae_dt), (model.clip, clip_dt)):
        place(module, offload, dt)


def model_dtypes(model) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(UNet/adapter, VAE, CLIP) dtypes the loader chose; a bundle from elsewhere keeps its own."""
    def pick(key, module):
        name = model.info.get(key)
        return dtype_from_name(name) if name else next(module.parameters()).dtype
    return pick("unet_dtype", model.unet), pick("vae_dtype", model.vae), pick("clip_dtype", model.clip)
