"""Temporal consistency beyond the paper, training-free: reference and cross-frame attention on the
dual-guidance denoiser (:mod:`dreampose.models.attention` holds the attention arithmetic).

:class:`ConsistentDenoiser` wraps a chunk's :class:`~dreampose.pipeline.guidance.DualCFGDenoiser`. At each
step the UNet call gets, before the frames, one row per guidance branch the step evaluates and per source
that is not a frame of the batch: the subject photo's latent (reference attention) and, after the first
chunk, the anchor's result (cross-frame attention), each noised to the step with the run's shared start
noise, under the branch's own image condition (the reference with the null pose, the anchor with its own
pose window where the branch has poses). Every self-attention layer of a frame row also attends to its
branch's source rows in the same layer. Within the first chunk the anchor is the chunk's first frame: no
extra row.
"""
from __future__ import annotations

import torch

from ..models.attention import SharedAttention
from ..settings import LATENT_CHANNELS, SamplingOptions
from .guidance import DualCFGDenoiser

POSE_BRANCH = 1   # the batch layout's image-and-pose third (guidance.py)


def consistency_sources(options: SamplingOptions) -> dict[str, float]:
    """The shared-attention sources the options switch on, with their blend weights (empty: all off)."""
    sources = {}
    if options.reference_attention > 0:
        sources["reference"] = float(options.reference_attention)
    if options.cross_frame_attention > 0:
        sources["anchor"] = float(options.cross_frame_attention)
    return sources


SourceRow = tuple[str, torch.Tensor, "torch.Tensor | None"]   # (source, clean latent, pose window or None)


def source_rows(sources: dict[str, float], reference: torch.Tensor | None,
                anchor: tuple[torch.Tensor, torch.Tensor] | None) -> list[SourceRow]:
    """The rows a call carries besides the frames, in order: ``(source, clean latent, pose window or None)`` for
    the reference (null pose) when it is on, and the anchor when it is on and not a frame of the batch."""
    rows = []
    if "reference" in sources:
        rows.append(("reference", reference, None))
    if "anchor" in sources and anchor is not None:
        rows.append(("anchor", *anchor))
    return rows


def anchor_frame(options: SamplingOptions, frames: slice, have_anchor: bool) -> int | None:
    """The frame of a finished chunk ``frames`` that anchors the chunks after it, or None to keep the anchor
    there is: the video's first frame once, or (``previous``) each chunk's last."""
    if options.cross_frame_anchor == "previous":
        return frames.stop - 1
    return None if have_anchor else frames.start


class ConsistentDenoiser:
    """``denoiser`` with shared self-attention (``shared``, already routed through the UNet).

    Args:
        denoiser: the chunk's dual-guidance denoiser.
        shared: the UNet's shared-attention state.
        scheduler: the chunk's scheduler (noises the clean rows to each step and scales them as the frames).
        noise: the run's shared start noise ``[1,4,h,w]``.
        reference: the subject photo's clean latent ``[1,4,h,w]`` (SD-scaled), when reference attention is on.
        anchor: ``(latent [1,4,h,w], pose window [1,10,h,w])`` of an earlier chunk's frame; None keeps the
            anchor in the batch (the first chunk, or cross-frame attention off).
    """

    def __init__(self, denoiser: DualCFGDenoiser, shared: SharedAttention, scheduler, noise: torch.Tensor, *,
                 reference: torch.Tensor | None = None, anchor: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.denoiser, self.shared, self.scheduler = denoiser, shared, scheduler
        d = denoiser
        rows = source_rows(shared.sources, reference, anchor)
        self.rows = tuple(name for name, _, _ in rows)
        self.clean = torch.cat([latent for _, latent, _ in rows]).to(d.device, torch.float32) if rows else None
        self.noise = noise.to(d.device, torch.float32)
        self.poses = [None if p is None else p.to(d.device, d.dtype) for _, _, p in rows]

    # what the sampling loop reads of a denoiser: the wrapped one's (the source rows count in its evaluations)
    @property
    def calls(self) -> int:
        return self.denoiser.calls

    @property
    def evaluations(self) -> int:
        return self.denoiser.evaluations

    @property
    def branches(self) -> list[int]:
        return self.denoiser.branches

    @property
    def frames(self) -> int:
        return self.denoiser.frames

    def _lead(self, branches: list[int], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source rows of every branch, group-major (branch by branch, sources in ``rows`` order)."""
        d = self.denoiser
        count = len(self.rows)
        noisy = self.scheduler.add_noise(self.clean, self.noise.expand(count, -1, -1, -1), t.reshape(1))
        noisy = self.scheduler.scale_model_input(noisy, t).to(d.dtype)
        model_in = torch.zeros(len(branches) * count, *d.model_in.shape[1:], device=d.device, dtype=d.dtype)
        hidden = []
        for g, b in enumerate(branches):
            for r in range(count):
                model_in[g * count + r, :LATENT_CHANNELS] = noisy[r]
                if b == POSE_BRANCH and self.poses[r] is not None:
                    model_in[g * count + r, LATENT_CHANNELS:] = self.poses[r][0]
            hidden.append(d.hidden[b * d.frames:b * d.frames + 1].expand(count, -1, -1))
        return model_in, torch.cat(hidden)

    def __call__(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        self.shared.mode, self.shared.groups = "use", len(self.denoiser.branches_at(t))
        self.shared.lead_rows = self.rows
        self.denoiser.lead = self._lead if self.rows else None
        try:
            return self.denoiser(latents, timestep)
        finally:
            self.shared.mode = "plain"
            self.denoiser.lead = None
