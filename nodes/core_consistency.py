"""Reference and cross-frame attention on ComfyUI's own sampling: core attention patches on a clone of the
MODEL (the user's MODEL is left as it is; nothing of core is monkeypatched).

The arithmetic is the library's (:class:`dreampose.models.attention.SharedAttention`), computed with core's
attention function (the backend the host chose: sdpa, xformers, sage, …):

* every self-attention block of the UNet gets an ``attn1`` replace patch that hands its projected q, k, v
  to :meth:`SharedAttention.attend`;
* a model-function wrapper puts, before the batch core assembled, one row per cond in the batch and per
  source that is not a frame of it (the subject photo's latent; after the first chunk the anchor's result),
  noised to the step's sigma with the run's shared noise, with that cond's image tokens and the null pose
  (the anchor: its pose window where the cond has poses), and drops their output. Core batches conds as
  groups of whole chunks (``cond_or_uncond``), so the layout is the library's.
"""
from __future__ import annotations

import torch
import comfy.ldm.modules.attention as core_attention
from comfy.ldm.modules.attention import SpatialTransformer

from ..dreampose.models.attention import SharedAttention
from ..dreampose.pipeline.consistency import source_rows
from ..dreampose.settings import VAE_SCALE


def self_attention_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """``(block, number, transformer index)`` of every self-attention of core's ldm UNet, as core's
    ``attn1`` replace patches are keyed."""
    keys = []
    for name, blocks in (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                         ("output", diffusion_model.output_blocks)):
        for number, block in enumerate(blocks):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    keys += [(name, number, j) for j in range(len(module.transformer_blocks))]
    return keys


class CoreSources:
    """The source rows of a native run: clean latents (SD-scaled, core's sampling space) and their poses."""

    def __init__(self, shared: SharedAttention, noise: torch.Tensor, reference: torch.Tensor | None):
        self.shared, self.noise, self.reference = shared, noise, reference
        self.anchor: tuple[torch.Tensor, torch.Tensor] | None = None   # set after the first chunk
        self.inner = None   # a model-function wrapper the MODEL already had: called with the extended batch

    def wrapper(self, apply_model, args: dict) -> torch.Tensor:
        x, t, c = args["input"], args["timestep"], dict(args["c"])
        groups = len(args["cond_or_uncond"])
        rows = source_rows(self.shared.sources, self.reference, self.anchor)
        self.shared.mode, self.shared.groups = "use", groups
        self.shared.lead_rows = tuple(name for name, _, _ in rows)
        try:
            if not rows:
                return self._apply(apply_model, x, t, c, args)
            frames = x.shape[0] // groups
            count = len(rows)
            sigma = t[:1].reshape(1, 1, 1, 1).to(x.device, torch.float32)
            clean = torch.cat([latent for _, latent, _ in rows]).to(x.device, torch.float32)
            noisy = (clean + sigma * self.noise.to(x.device, torch.float32)).to(x.dtype)
            lead_x = noisy.repeat(groups, 1, 1, 1)
            concat, cross = c["c_concat"], c["c_crossattn"]
            lead_pose = concat.new_zeros((groups * count, *concat.shape[1:]))
            for g in range(groups):
                has_pose = bool(concat[g * frames].abs().amax() > 0)
                for r, (_, _, pose) in enumerate(rows):
                    if pose is not None and has_pose:
                        lead_pose[g * count + r] = pose[0].to(concat.device, concat.dtype)
            lead_cross = cross[torch.arange(groups, device=cross.device).repeat_interleave(count) * frames]
            c["c_concat"] = torch.cat([lead_pose, concat])
            c["c_crossattn"] = torch.cat([lead_cross, cross])
            out = self._apply(apply_model, torch.cat([lead_x, x]), torch.cat([t[:1].expand(groups * count), t]), c,
                              args)
            return out[groups * count:]
        finally:
            self.shared.mode = "plain"

    def _apply(self, apply_model, x, t, c, args):
        if self.inner is None:
            return apply_model(x, t, **c)
        return self.inner(apply_model, {**args, "input": x, "timestep": t, "c": c})

    def attention(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")

        def core(q_, k_, v_, h):
            return core_attention.optimized_attention(q_, k_, v_, h, attn_precision=precision)

        return self.shared.attend(q, k, v, heads, core)


def consistent_model(model, sources: CoreSources):
    """A clone of the core MODEL ``model`` whose self-attention is shared as ``sources`` says."""
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    for block, number, index in self_attention_blocks(diffusion_model):
        patched.set_model_attn1_replace(sources.attention, block, number, index)
    sources.inner = patched.model_options.get("model_function_wrapper")
    patched.set_model_unet_function_wrapper(sources.wrapper)
    return patched


def chunk_anchor(latents: torch.Tensor, frame: int, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor of later chunks: frame ``frame`` of a finished chunk's core latents (unscaled, core's LATENT
    convention) in the SD-scaled sampling space, with its pose window ``pose`` ``[1,10,h,w]``."""
    return latents[frame:frame + 1].float() * VAE_SCALE, pose
