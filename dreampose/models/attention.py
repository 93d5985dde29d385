"""Shared self-attention: a frame's self-attention also attends to the features of other images.

Frames of a DreamPose video are sampled independently, so textures and identity drift from frame to frame
(the paper's first limitation). Two training-free remedies from video editing and pose-animation work
extend every UNet self-attention layer's keys and values with another image's, computed at the same
timestep in the same layer:

* ``reference``: the subject photo itself (its latent noised to the step, one more row of the same UNet
  call), so every frame draws texture and identity from one source;
* ``anchor`` (cross-frame attention): an anchor frame of the video, the first frame of the same batch,
  or an earlier chunk's result noised to the step (one more row), so consecutive chunks stay alike.

Each source has a blend weight w: ``out = plain + Σ_s w_s · (attention(q, [k; k_s], [v; v_s]) − plain)``;
w = 0 gives the plain layer, w = 1 attention over its own and the source's tokens (one call when it is
the only source). The arithmetic is here once, on projected ``q, k, v`` ``[B,L,C]``, with the attention
function as a parameter: the library passes PyTorch's SDPA through diffusers attention processors
(:func:`shared_self_attention`); the ComfyUI nodes pass core's attention through core attention patches.

The batch of a call is, first, one row per guidance branch and source not in the batch otherwise (the
*lead* rows: their layers attend plainly, so they compute exactly what a UNet call of their own would),
then ``groups`` guidance branches of frames; a frame row's keys and values are extended with its branch's
source rows'. One call, so the sources cost their rows, not a call of their own.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import DreamPoseError

SOURCES = ("reference", "anchor")
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on ``[B,L,C]`` projections (heads folded into C), PyTorch's fused kernel."""
    b, lq, c = q.shape
    d = c // heads

    def split(x):
        return x.view(b, -1, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, lq, c)


@dataclass
class SharedAttention:
    """The state every shared self-attention layer of one UNet reads during a call.

    ``sources``: the enabled sources and their blend weights (a source enabled with weight 0 still runs:
    that is how tests show the layer equals the plain one). ``mode``: ``plain`` (layers behave as the
    UNet's own) or ``use``. In a use call the batch is ``lead_rows`` rows per guidance group first (the
    sources' own rows, group-major; they attend plainly), then ``groups`` groups of frames; an ``anchor``
    that is not among the lead rows is the first frame of each group.
    """

    sources: dict[str, float] = field(default_factory=dict)
    mode: str = "plain"
    groups: int = 1
    lead_rows: tuple[str, ...] = ()

    def __post_init__(self):
        for name, weight in self.sources.items():
            if name not in SOURCES:
                raise DreamPoseError(f"unknown shared-attention source {name!r}; choose from {', '.join(SOURCES)}")
            if not 0.0 <= float(weight) <= 1.0:
                raise DreamPoseError(f"the {name} attention weight must lie in 0..1, got {weight}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               attention: AttentionFn = sdpa) -> torch.Tensor:
        """One self-attention layer on projected ``q, k, v`` ``[B,L,C]``."""
        if self.mode != "use" or not self.sources:
            return attention(q, k, v, heads)
        lead = self.groups * len(self.lead_rows)
        body = q.shape[0] - lead
        if body <= 0 or body % self.groups:
            raise DreamPoseError(f"a batch of {q.shape[0]} rows is not {lead} source rows and {self.groups} equal "
                                 "guidance groups of frames")
        frames = body // self.groups
        qb, kb, vb = q[lead:], k[lead:], v[lead:]
        plain = out = None
        for name, weight in self.sources.items():
            ek, ev = self._extra(name, k[:lead], v[:lead], kb, vb, frames)
            ext = attention(qb, torch.cat([kb, ek], 1), torch.cat([vb, ev], 1), heads)
            if weight == 1.0 and len(self.sources) == 1:
                out = ext
                break
            if plain is None:
                plain = out = attention(qb, kb, vb, heads)
            out = out + weight * (ext - plain)
        if not lead:
            return out
        return torch.cat([attention(q[:lead], k[:lead], v[:lead], heads), out])

    def _extra(self, name: str, lead_k, lead_v, k: torch.Tensor, v: torch.Tensor, frames: int):
        """The source's keys and values for every frame row: its row of the row's guidance group, repeated."""
        if name in self.lead_rows:
            rows = torch.arange(self.groups, device=k.device) * len(self.lead_rows) + self.lead_rows.index(name)
            sk, sv = lead_k[rows], lead_v[rows]
        elif name == "anchor":
            rows = torch.arange(self.groups, device=k.device) * frames
            sk, sv = k[rows], v[rows]
        else:
            raise DreamPoseError(f"the {name} source has no rows in this batch")
        return sk.repeat_interleave(frames, 0), sv.repeat_interleave(frames, 0)


class SharedAttnProcessor:
    """A diffusers attention processor for a UNet self-attention layer (``attn1``) that routes the
    attention through :meth:`SharedAttention.attend`; anything else (cross-attention, masks, norms this
    processor does not reproduce) goes to the layer's own processor."""

    def __init__(self, shared: SharedAttention, original):
        self.shared, self.original = shared, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        plain_layer = (encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3
                       and attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
                       and attn.norm_q is None and attn.norm_k is None)
        if self.shared.mode == "plain" or not plain_layer:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        out = self.shared.attend(attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states),
                                 attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def self_attention_keys(unet) -> list[str]:
    """The processor names of a diffusers UNet's self-attention layers (``…attn1.processor``)."""
    return [name for name in unet.attn_processors if name.endswith("attn1.processor")]


@contextmanager
def shared_self_attention(unet, shared: SharedAttention) -> Iterator[SharedAttention]:
    """Route every self-attention layer of a diffusers ``unet`` through ``shared`` for the block; the
    UNet's own processors are put back afterwards, whatever happens (the model is left as it was)."""
    originals = dict(unet.attn_processors)
    keys = set(self_attention_keys(unet))
    if not keys:
        raise DreamPoseError("this UNet has no self-attention layers to share")
    unet.set_attn_processor({name: SharedAttnProcessor(shared, proc) if name in keys else proc
                             for name, proc in originals.items()})
    try:
        yield shared
    finally:
        unet.set_attn_processor(originals)
        shared.mode = "plain"
