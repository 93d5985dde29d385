"""Device and precision choices outside ComfyUI (the command line and the benchmark)."""
from __future__ import annotations

import torch

from ..errors import DreamPoseError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit device that is not there is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DreamPoseError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DreamPoseError(f"device {name!r} asked for, but this PyTorch build sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DreamPoseError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DreamPoseError("device 'mps' asked for, but MPS is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → fp16 on a GPU (as the official inference ran), fp32 on the CPU."""
    if name in (None, "", "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise DreamPoseError(f"unknown dtype {name!r}; use one of {DTYPE_CHOICES}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def place_model(model, device: torch.device, dtype: torch.dtype):
    """UNet, adapter and VAE in ``dtype``; CLIP stays fp32 (it runs once per subject, as officially).

    In place, like ``DreamPoseModel.to``, but through ``torch.nn.Module.to``: diffusers' own ``to``
    logs a "modules that should be kept in float32: []" warning for every dtype argument, even an
    empty list of such modules, which would only confuse a command-line user.
    """
    for net, want in ((model.unet, dtype), (model.adapter, dtype), (model.vae, dtype), (model.clip, torch.float32)):
        torch.nn.Module.to(net, device=device, dtype=want)
    return model
