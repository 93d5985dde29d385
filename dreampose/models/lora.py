"""A LoRA delta of the UNet: the factors a LoRA subject finetune learnt, merged into the weights.

``W ← W + scale·B·A`` for each attention projection (A ``[r,in]``, B ``[out,r]``, fp32 on the CPU).
A UNet that carries a merged delta remembers it (weakly, keyed by the UNet object), so the delta
alone can be saved as a small subject file instead of the whole UNet.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DreamPoseError

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # the attention projections of every transformer block


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


def kohya_state(delta: LoraDelta) -> dict[str, torch.Tensor]:
    """The delta in the kohya LoRA key format that most Stable Diffusion tools read, ComfyUI's LoRA
    loaders among them: per Linear of the diffusers UNet, ``lora_unet_<name, dots as _>.lora_down.weight``
    (A), ``.lora_up.weight`` (B) and ``.alpha`` (the loader's scale is alpha / rank, as here)."""
    state = {}
    for name, (a, b) in sorted(delta.factors.items()):
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = a.contiguous()
        state[f"{key}.lora_up.weight"] = b.contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(delta.alpha))
    return state
