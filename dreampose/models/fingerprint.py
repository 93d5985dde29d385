"""Identifying weights cheaply: a digest (exact identity) and a fingerprint (identity across dtypes).

Both look at a strided sample of at most 4096 values of every tensor, with its name, shape and
dtype: finetuning changes essentially every value, so the samples see it, and hashing a UNet
costs milliseconds instead of a pass over 860 M parameters. The digest decides whether a saved
finetune was made from these very weights (its cache key); the fingerprint whether a LoRA delta is
being applied to the base it was trained on, in whatever precision that base is loaded now.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

SAMPLE_PER_TENSOR = 4096
FINGERPRINT_TENSORS = 64
FINGERPRINT_RTOL = 1e-2


def strided_sample(t: torch.Tensor) -> torch.Tensor:
    """At most ``SAMPLE_PER_TENSOR`` evenly strided values of ``t``, flattened, on the CPU."""
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE_PER_TENSOR)
    return flat[::stride][:SAMPLE_PER_TENSOR].cpu().contiguous()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (for hashing)."""
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
                h.update(tensor_bytes(strided_sample(t)))
    return h.hexdigest()


def weights_fingerprint(module: nn.Module, count: int = FINGERPRINT_TENSORS) -> list[float]:
    """Mean |value| of a strided sample of ``count`` evenly spread tensors: equal, within rounding,
    for the same weights in fp32, fp16 or bf16, and far apart for other weights."""
    items = [(n, t) for n, t in sorted(module.state_dict().items()) if t.is_floating_point() and t.numel() > 1]
    if not items:
        return []
    picks = sorted({round(i * (len(items) - 1) / max(count - 1, 1)) for i in range(min(count, len(items)))})
    with torch.inference_mode(False):
        return [float(strided_sample(items[i][1]).float().abs().mean()) for i in picks]


def fingerprints_match(a, b, rtol: float = FINGERPRINT_RTOL) -> bool:
    if len(a) != len(b) or not a:
        return False
    return all(abs(x - y) <= rtol * max(abs(x), abs(y)) + 1e-7 for x, y in zip(a, b))
