"""Dual classifier-free guidance (paper §4.4, Eq. 4) with the three branches in one UNet call.

ε = ε(∅,∅) + s_I·(ε(I,∅) − ε(∅,∅)) + s_p·(ε(I,P) − ε(I,∅))

The batch is laid out as the official pipeline did — [null image & null pose | image & pose |
image & null pose] — with every frame of a chunk in each third. Everything that does not change
between steps (the pose channels, the zero "null pose", the cross-attention states) is built once
per chunk; a step only copies the latents into a preallocated input buffer.
"""
from __future__ import annotations

import torch

from ..settings import LATENT_CHANNELS


def dual_cfg(eps_uncond: torch.Tensor, eps_image: torch.Tensor, eps_full: torch.Tensor,
             s_image: float, s_pose: float) -> torch.Tensor:
    """The paper's combination of the three noise predictions."""
    return eps_uncond + s_image * (eps_image - eps_uncond) + s_pose * (eps_full - eps_image)


class DualCFGDenoiser:
    """ε for ``n`` frames at once: one UNet call of batch ``3n`` per step.

    ``pose`` is ``[n,10,h,w]`` (already normalised, at latent size); ``cond``/``uncond`` are
    ``[1,T,D]`` or ``[n,T,D]`` adapter outputs. The null pose is zeros after normalisation, as in the
    official pipeline (docs/official-code.md, quirk #10).
    """

    def __init__(self, unet, cond: torch.Tensor, uncond: torch.Tensor, pose: torch.Tensor,
                 s_image: float, s_pose: float):
        self.unet, self.s_image, self.s_pose = unet, float(s_image), float(s_pose)
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        n, pose_ch, h, w = pose.shape
        self.frames = n
        self.hidden = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1), cond.expand(n, -1, -1)]
                                ).to(self.device, self.dtype)
        self.model_in = torch.zeros(3 * n, LATENT_CHANNELS + pose_ch, h, w, device=self.device, dtype=self.dtype)
        self.model_in[n:2 * n, LATENT_CHANNELS:] = pose.to(self.device, self.dtype)
        self.calls = 0

    def __call__(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """``latents`` [n,4,h,w] (already scaled by the scheduler) → guided ε [n,4,h,w]."""
        n = self.frames
        x = latents.to(self.dtype)
        for branch in range(3):
            self.model_in[branch * n:(branch + 1) * n, :LATENT_CHANNELS] = x
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        out = self.unet(self.model_in, t.to(self.device), encoder_hidden_states=self.hidden).sample
        self.calls += 1
        eps_uncond, eps_full, eps_image = out.float().chunk(3)
        return dual_cfg(eps_uncond, eps_image, eps_full, self.s_image, self.s_pose).to(latents.dtype)
