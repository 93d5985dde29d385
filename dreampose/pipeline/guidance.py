"""Dual classifier-free guidance (paper §4.4, Eq. 4) with the branches it needs in one UNet call.

ε = ε(∅,∅) + s_I·(ε(I,∅) − ε(∅,∅)) + s_p·(ε(I,P) − ε(I,∅))

The batch is laid out as the official pipeline did — [null image & null pose | image & pose |
image & null pose] — with every frame of a chunk in each third. Everything that does not change
between steps (the pose channels, the zero "null pose", the cross-attention states) is built once
per chunk; a step only copies the latents into a preallocated input buffer. Two ways to run fewer
branches, both exact: a branch whose weight in Eq. 4 is zero is skipped (:func:`branch_weights`), and
guidance can be limited to an interval of the schedule (:func:`guided_at`), outside which only
ε(I,P) is evaluated.
"""
from __future__ import annotations

import torch

from ..settings import LATENT_CHANNELS, check_guidance_interval

TRAIN_TIMESTEPS = 1000   # SD 1.x's discrete schedule: timesteps 0 … 999


def guided_at(timestep, start: float = 0.0, end: float = 1.0, train_timesteps: int = TRAIN_TIMESTEPS) -> bool:
    """Whether dual guidance applies at ``timestep``, for guidance limited to the part ``start`` … ``end``
    of the schedule (fractions: 0 the noisiest end, 1 the clean end; Kynkäänniemi et al. 2024 guide only
    in the middle). A fraction p is timestep (1 − p)·(T − 1), as ComfyUI's ``percent_to_sigma`` counts, so
    both engines decide alike; the full interval 0 … 1 guides every step."""
    last = train_timesteps - 1
    t = float(timestep)
    return (1.0 - end) * last <= t <= (1.0 - start) * last


def dual_cfg(eps_uncond: torch.Tensor, eps_image: torch.Tensor, eps_full: torch.Tensor,
             s_image: float, s_pose: float) -> torch.Tensor:
    """The paper's combination of the three noise predictions."""
    return eps_uncond + s_image * (eps_image - eps_uncond) + s_pose * (eps_full - eps_image)


def branch_weights(s_image: float, s_pose: float) -> tuple[float, float, float]:
    """Eq. 4 as a weighted sum, ε = w∅·ε(∅,∅) + w_IP·ε(I,P) + w_I·ε(I,∅), in the batch order
    (null, image & pose, image): w∅ = 1 − s_I, w_IP = s_p, w_I = s_I − s_p. A branch of weight 0 need
    not run: s_I = s_p (the demo's 3/3) needs no image-only branch, s_I = 1 no null branch."""
    return 1.0 - s_image, s_pose, s_image - s_pose


class DualCFGDenoiser:
    """ε for ``n`` frames at once: one UNet call per step over the branches the guidance needs.

    ``pose`` is ``[n,10,h,w]`` (already normalised, at latent size); ``cond``/``uncond`` are
    ``[1,T,D]`` or ``[n,T,D]`` adapter outputs. The null pose is zeros after normalisation, as in the
    official pipeline (docs/official-code.md, quirk #10). With all three branch weights non-zero the
    call has batch ``3n`` and combines them exactly as :func:`dual_cfg`; a branch of weight 0
    (:func:`branch_weights`) is left out of the batch; outside the guidance ``interval``
    (:func:`guided_at`) only the image-and-pose branch runs.
    """

    def __init__(self, unet, cond: torch.Tensor, uncond: torch.Tensor, pose: torch.Tensor,
                 s_image: float, s_pose: float, interval: tuple[float, float] = (0.0, 1.0)):
        self.unet, self.s_image, self.s_pose = unet, float(s_image), float(s_pose)
        self.interval = check_guidance_interval(*interval)
        weights = branch_weights(self.s_image, self.s_pose)
        self.branches = [i for i, w in enumerate(weights) if w != 0.0]
        self.weights = [weights[i] for i in self.branches]
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        n, pose_ch, h, w = pose.shape
        self.frames = n
        self.hidden = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1), cond.expand(n, -1, -1)]
                                ).to(self.device, self.dtype)
        self.model_in = torch.zeros(3 * n, LATENT_CHANNELS + pose_ch, h, w, device=self.device, dtype=self.dtype)
        self.model_in[n:2 * n, LATENT_CHANNELS:] = pose.to(self.device, self.dtype)
        self.calls = 0
        self.evaluations = 0   # image evaluations: frames × branches, summed over calls
        # lead(branches, t) → (model_in, hidden) rows to put before the frames in the same UNet call (their
        # output is dropped): the sources of shared attention (pipeline/consistency.py); None: none
        self.lead = None

    def inputs(self, branches: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's input and cross-attention states for ``branches`` (indices into the batch layout;
        default: the ones the guidance needs), ``[len·n,14,h,w]`` and ``[len·n,T,D]``: views of the buffers
        when the branches are consecutive, else copies."""
        branches = self.branches if branches is None else branches
        n = self.frames
        lo, hi = branches[0], branches[-1] + 1
        if hi - lo == len(branches):        # consecutive thirds of the buffer: views, no copy
            return self.model_in[lo * n:hi * n], self.hidden[lo * n:hi * n]
        rows = torch.cat([torch.arange(b * n, (b + 1) * n) for b in branches]).to(self.device)
        return self.model_in[rows], self.hidden[rows]

    def branches_at(self, timestep) -> list[int]:
        """The branches (indices into the batch layout) a call at ``timestep`` evaluates."""
        return self.branches if guided_at(timestep, *self.interval) else [1]

    def _run(self, branches: list[int], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet on ``branches`` (indices into the batch layout) for latents ``x``: ``[len·n,4,h,w]``."""
        n = self.frames
        model_in, hidden = self.inputs(branches)
        for i in range(len(branches)):
            model_in[i * n:(i + 1) * n, :LATENT_CHANNELS] = x
        lead = self.lead(branches, t) if self.lead is not None else None
        if lead is not None:
            model_in, hidden = torch.cat([lead[0], model_in]), torch.cat([lead[1], hidden])
        self.calls += 1
        self.evaluations += model_in.shape[0]
        out = self.unet(model_in, t.to(self.device), encoder_hidden_states=hidden).sample.float()
        return out if lead is None else out[lead[0].shape[0]:]

    def __call__(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """``latents`` [n,4,h,w] (already scaled by the scheduler) → guided ε [n,4,h,w]."""
        x = latents.to(self.dtype)
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        if not guided_at(t, *self.interval):
            return self._run([1], x, t).to(latents.dtype)
        out = self._run(self.branches, x, t)
        if len(self.branches) == 3:
            eps_uncond, eps_full, eps_image = out.chunk(3)
            return dual_cfg(eps_uncond, eps_image, eps_full, self.s_image, self.s_pose).to(latents.dtype)
        parts = out.chunk(len(self.branches))
        eps = parts[0] * self.weights[0]
        for part, weight in zip(parts[1:], self.weights[1:]):
            eps = eps + part * weight
        return eps.to(latents.dtype)
