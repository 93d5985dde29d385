"""Devices and dtypes the ComfyUI way: ask ``comfy.model_management``, and let it hold the networks.

The UNet, CLIP and VAE are core objects (``nodes/native.py``) that core loads and offloads itself,
partially when memory is short. What is DreamPose's own — the adapter, and the trainable copies a
finetune makes — gets one :class:`DreamPosePatcher` each: the nodes load them with
``mm.load_models_gpu`` like core models, so they show up in ``current_loaded_models`` and are
offloaded whenever the host needs the memory. Plain modules have no cast-weight ops to run partially
offloaded, so they are always loaded whole (they are small).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import comfy.model_management as mm
import comfy.model_patcher

from ..dreampose.models.devices import dtype_from_name

SD15_INFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_dtypes(choice: str, device: torch.device, params: int,
                weight_dtype: torch.dtype | None = None) -> tuple[torch.dtype, torch.dtype | None, bool]:
    """(storage dtype, compute dtype if it differs, fp8 fast matmuls) of the UNet, by core's rules.

    ``auto``: core's ``unet_dtype`` (the ``--fp16-unet`` style flags first, then fp16 → bf16 → fp32 as
    the device computes them); fp8 choices store the weights in 8 bits and compute in the dtype core's
    ``unet_manual_cast`` picks, as core's UNet loader does.
    """
    fast = choice == "fp8_e4m3fn_fast"
    if choice == "auto":
        dtype = mm.unet_dtype(device, model_params=params, supported_dtypes=list(SD15_INFERENCE_DTYPES),
                              weight_dtype=weight_dtype)
    else:
        dtype = FP8_DTYPES.get(choice) or dtype_from_name(choice)
    return dtype, mm.unet_manual_cast(dtype, device, list(SD15_INFERENCE_DTYPES)), fast


def unet_dtype(choice: str, device: torch.device, params: int) -> torch.dtype:
    """The UNet's storage dtype for ``choice`` (see :func:`unet_dtypes`)."""
    return unet_dtypes(choice, device, params)[0]


def vae_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto`` is never fp16: the SD VAE overflows to NaN/black frames in fp16."""
    if choice != "auto":
        return dtype_from_name(choice)
    dtype = mm.vae_dtype(device, allowed_dtypes=[torch.bfloat16])
    if dtype == torch.float16:  # only when forced by --fp16-vae
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    return dtype


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


def release(module: torch.nn.Module) -> None:
    """Let ComfyUI unload ``module`` if it holds it loaded (back to the offload device)."""
    ref = module.__dict__.get(_PATCHER_ATTR)
    patcher = ref() if ref is not None else None
    if patcher is None or patcher.network is not module:
        return
    unload(patcher)


def unload(patcher) -> None:
    """Have ComfyUI unload ``patcher`` (ours or core's) wholly to its offload device, if it holds it loaded."""
    for lm in [lm for lm in mm.current_loaded_models if lm.model is patcher]:
        lm.model_unload()
        mm.current_loaded_models.remove(lm)


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move/cast in place. ComfyUI lets go of the module first if it holds it loaded, so its
    bookkeeping never disagrees with where the weights are. ``torch.nn.Module.to`` directly:
    diffusers' override logs a keep-in-fp32 warning on every call that names a dtype."""
    release(module)
    torch.nn.Module.to(module, device=device, dtype=dtype)


@contextmanager
def borrowed(modules: list[torch.nn.Module], extra_memory: int = 0, owner=None, core: list = ()):
    """Have ComfyUI load ``modules`` (our plain networks) and ``core`` (core patchers of the small
    networks: CLIP, VAE) on its torch device for the block, with ``extra_memory`` bytes of working
    memory, evicting other models as it sees fit. Loaded whole, in one call, so none evicts another;
    they stay registered as loaded afterwards and are offloaded when the host needs the room. (The
    UNet is never borrowed: core's samplers load it, partially when memory is short.)"""
    patchers = [patcher_for(module, owner) for module in modules]
    mm.load_models_gpu(patchers + list(core), memory_required=extra_memory, force_full_load=True)
    try:
        yield mm.get_torch_device()
    finally:
        mm.soft_empty_cache()
