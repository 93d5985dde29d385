"""DreamPose's dual guidance on ComfyUI's own sampling stack.

* :func:`pose_conditionings` — the three conds of dual classifier-free guidance as core
  CONDITIONING: ``positive`` = image + pose, ``image_only`` = image + null pose, ``negative`` =
  null image + null pose. The pose windows ride on each cond as ``noise_concat``
  (``BaseModel.extra_conds`` turns it into ``c_concat``, one window per frame); the null pose is
  explicit zeros (docs/official-code.md, quirk #10), on the same device as the poses so core batches
  the three conds into one UNet call.
* :func:`dual_cfg_guider` — core's ``Guider_DualCFG`` (style regular) set up as DreamPose's Eq. 4:
  ``cfg_cond2_negative`` = s_I, ``cfg_conds`` = s_p.
* :func:`library_sampler` — the library's schedulers (PNDM, DDIM, DPM++ 2M, Euler a, UniPC on SD 1.x's
  "leading" timesteps, as the authors sampled) as a core sampler: core evaluates the model (patches,
  LoRAs, attention backends, partial loading), the scheduler's own arithmetic takes the steps, so the
  frames equal the library's.
"""
from __future__ import annotations

import torch
import comfy.samplers
import comfy.utils
from comfy_extras.nodes_custom_sampler import Guider_DualCFG

from ..dreampose.errors import DreamPoseError
from ..dreampose.pipeline.guidance import guided_at
from ..dreampose.pipeline.sampling import make_scheduler
from ..dreampose.settings import check_guidance_interval


def pose_conditionings(image: list, null: list, pose: torch.Tensor) -> tuple[list, list, list]:
    """(positive, image_only, negative) CONDITIONING for pose windows ``pose`` ``[F,10,h,w]``.

    ``image`` and ``null`` are CONDITIONING of the subject and of the null image
    (``CLIPVAEAdapterEncode``'s outputs): every entry gets the poses (positive) or zeros.
    """
    if pose.ndim != 4:
        raise DreamPoseError(f"pose windows must be [frames, 10, h, w], got {tuple(pose.shape)}")
    zeros = torch.zeros_like(pose)

    def attach(conditioning, value):
        return [[tokens, {**extras, "noise_concat": value}] for tokens, extras in conditioning]

    return attach(image, pose), attach(image, zeros), attach(null, zeros)


class IntervalDualCFG(Guider_DualCFG):
    """Core's dual-CFG guider, guiding only inside a part of the schedule (``interval``, fractions as
    :func:`dreampose.pipeline.guidance.guided_at` reads them); outside it both scales are 1, so core
    drops the two null branches and evaluates the image-and-pose cond alone."""

    interval = (0.0, 1.0)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        ms = self.model_patcher.get_model_object("model_sampling")
        if guided_at(ms.timestep(timestep.flatten()[:1]).item(), *self.interval):
            return super().predict_noise(x, timestep, model_options, seed)
        scales = self.cfg1, self.cfg2
        self.cfg1 = self.cfg2 = 1.0
        try:
            return super().predict_noise(x, timestep, model_options, seed)
        finally:
            self.cfg1, self.cfg2 = scales


def dual_cfg_guider(model, positive: list, image_only: list, negative: list, s_image: float,
                    s_pose: float, interval: tuple[float, float] = (0.0, 1.0)) -> Guider_DualCFG:
    """Core's dual-CFG guider computing ε(∅,∅) + s_I·(ε(I,∅) − ε(∅,∅)) + s_p·(ε(I,P) − ε(I,∅)); with an
    ``interval`` other than the whole schedule, :class:`IntervalDualCFG`."""
    interval = check_guidance_interval(*interval)
    if interval == (0.0, 1.0):
        guider = Guider_DualCFG(model)
    else:
        guider = IntervalDualCFG(model)
        guider.interval = interval
    guider.set_conds(positive, image_only, negative)
    guider.set_cfg(s_pose, s_image, nested=False)
    return guider


def schedule_sigmas(model, sampler: str, steps: int, scheduler_config: dict) -> torch.Tensor:
    """The sigmas of a library scheduler's timesteps (plus the final 0), in the model's noise schedule."""
    scheduler = make_scheduler(sampler, scheduler_config)
    scheduler.set_timesteps(steps)
    ms = model.get_model_object("model_sampling")
    return torch.cat([ms.sigma(scheduler.timesteps.float()), torch.zeros(1)])


def library_sampler(sampler: str, steps: int, scheduler_config: dict, x_start: torch.Tensor,
                    generator: torch.Generator | None) -> comfy.samplers.KSAMPLER:
    """A core sampler that steps with the library's scheduler from ``x_start`` (``[n,4,h,w]``, in the
    scheduler's own space, SD-scaled: the library's x_T), drawing ancestral noise from ``generator``.

    Core hands the function its denoiser (the guider's, with every patch and wrapper); the function
    turns the denoised prediction back into the ε the scheduler steps with. The noise core passes in
    is not used: x_T is the library's, so the frames equal the library's run.
    """
    def sample(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        scheduler = make_scheduler(sampler, scheduler_config)
        scheduler.set_timesteps(steps, device=x.device)
        ms = model_k.inner_model.inner_model.model_sampling
        latents = x_start.to(x.device, torch.float32)
        s_in = x.new_ones([x.shape[0]])
        step_kwargs = {"generator": generator} if sampler == "euler_a" else {}
        for i, t in enumerate(scheduler.timesteps):
            sigma = ms.sigma(t.float().reshape(1)).to(x.device)
            # core's EPS models take x·sqrt(σ²+1) and divide it back: the UNet sees the scheduler's input
            model_in = scheduler.scale_model_input(latents, t) * (sigma ** 2 + 1) ** 0.5
            denoised = model_k(model_in, sigma * s_in, **extra_args)
            eps = (model_in - denoised.float()) / sigma
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
            if callback is not None:
                callback({"i": i, "denoised": denoised, "x": latents, "sigma": sigma, "sigma_hat": sigma})
        return latents

    return comfy.samplers.KSAMPLER(sample)


def core_sigmas(model, sampler: str, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas core's KSampler would use for ``sampler``/``scheduler`` (its penultimate-sigma rule included)."""
    discard = sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler,
                                             steps + int(discard))
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def sample_chunk(model, positive: list, image_only: list, negative: list, s_image: float, s_pose: float, *,
                 sampler, sigmas: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, seed: int,
                 callback=None, interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """One chunk of frames through core: ``Guider_DualCFG`` + ``sampler`` over ``sigmas``, from
    ``latent_image`` (unscaled, core's LATENT convention; zeros for pure noise) and ``noise``.

    Returns:
        The denoised latents, unscaled (what a core LATENT holds), float32.
    """
    guider = dual_cfg_guider(model, positive, image_only, negative, s_image, s_pose, interval)
    return guider.sample(noise, latent_image, sampler, sigmas, callback=callback,
                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
