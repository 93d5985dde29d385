"""Where networks run and in which precision, and random draws that do not depend on either.

The command line and the benchmarks pick devices and dtypes here (``resolve_device``,
``resolve_dtype``); inside ComfyUI the host picks them and the nodes only name them with
:func:`dtype_name`. Every random draw of the library comes from an explicit CPU generator
(:func:`randn`), so a seed gives the same numbers on any device.
"""
from __future__ import annotations

import torch

from ..errors import DreamPoseError
from ..settings import DTYPE_CHOICES

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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
            raise DreamPoseError(f"device {name!r} asked for, but this PyTorch build sees no CUDA GPU; use "
                                 "--device cpu")
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
    """``fp32``/``fp16``/``bf16`` (the names of the dtype options); other dtypes as torch prints them."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_from_name(name: str) -> torch.dtype:
    """The inverse of :func:`dtype_name` (``float16`` style names accepted too)."""
    if name not in DTYPES:
        raise DreamPoseError(f"unknown dtype {name!r}; use one of {DTYPE_CHOICES[1:]}")
    return DTYPES[name]


def module_place(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first parameter."""
    p = next(module.parameters())
    return p.device, p.dtype


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU from ``generator``, then moved to ``device``:
    the same seed gives the same numbers whatever the device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
