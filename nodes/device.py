"""Devices and dtypes the ComfyUI way: ask ``comfy.model_management``, borrow the GPU, give it back.

DreamPose's networks are diffusers/transformers modules, not ComfyUI ``ModelPatcher``s, so they
are moved explicitly (as core's upscale-model node does): make room with ``free_memory`` so other
loaded models are evicted first, work, and always return to the offload device afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import comfy.model_management as mm
from comfy.cli_args import args

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNET_DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
VAE_DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name)


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_dtype(choice: str, device: torch.device, params: int) -> torch.dtype:
    """``auto``: the CLI's --fp16/bf16/fp32-unet if given, else fp16 → bf16 → fp32, whichever
    ComfyUI says the device computes well (no manual-cast fallbacks: diffusers computes in the
    weights' dtype)."""
    if choice != "auto":
        return DTYPES[choice]
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
        return DTYPES[choice]
    dtype = mm.vae_dtype(device, allowed_dtypes=[torch.bfloat16])
    if dtype == torch.float16:  # only when forced by --fp16-vae
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    return dtype


def working_memory(batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Rough activation memory of an SD 1.x UNet call (same order as core's SD15 estimate) plus
    ComfyUI's inference reserve."""
    latent_area = batch * (height // 8) * (width // 8)
    return int(latent_area * mm.dtype_size(dtype) * 0.01 * 1024 * 1024 + mm.minimum_inference_memory())


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move/cast in place. ``torch.nn.Module.to`` directly: diffusers' override logs a keep-in-fp32
    warning on every call that names a dtype, even an unchanged one (SD has no such modules)."""
    torch.nn.Module.to(module, device=device, dtype=dtype)


@contextmanager
def borrowed(modules: list[tuple[torch.nn.Module, torch.dtype]], extra_memory: int = 0):
    """Move ``modules`` (with their dtypes) to ComfyUI's torch device for the block; always move
    them back to the offload device, also on error or cancel."""
    device = mm.get_torch_device()
    offload = mm.unet_offload_device()
    needed = sum(mm.module_size(m) for m, _ in modules) + extra_memory
    mm.free_memory(needed, device)
    try:
        for module, dtype in modules:
            place(module, device, dtype)
        yield device
    finally:
        for module, dtype in modules:
            place(module, offload, dtype)
        mm.soft_empty_cache()


def model_dtypes(model) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(UNet/adapter, VAE, CLIP) dtypes the loader chose; a bundle from elsewhere keeps its own."""
    def pick(key, module):
        name = model.info.get(key)
        return dtype_from_name(name) if name else next(module.parameters()).dtype
    return pick("unet_dtype", model.unet), pick("vae_dtype", model.vae), pick("clip_dtype", model.clip)
