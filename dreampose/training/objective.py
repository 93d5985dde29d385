"""What stage-1 training and the subject finetune share: the frozen encodings of a condition frame,
the pose channels, conditioning dropout and Stable Diffusion's denoising loss.

Everything is built the way the sampler builds it at inference, so training and sampling agree: the
condition frame is resized to 640×512 with PIL bicubic and seen by CLIP through CLIPProcessor's
arithmetic (on uint8 pixels: docs/official-code.md, quirk #7) and by the VAE in the model's
convention; the null image and the null pose are the sampler's (quirk #10).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..configs import clean_config
from ..models.devices import module_place
from ..pipeline.conditioning import vae_inputs
from ..pipeline.images import clip_pixels
from ..settings import COND_HEIGHT, COND_WIDTH, LATENT_SCALE, POSE_FRAMES


def resize(x: torch.Tensor, height: int, width: int, antialias: bool) -> torch.Tensor:
    """Bilinear resize of one ``[C,H,W]`` tensor (photos antialiased, poses not, like the sampler's)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x.unsqueeze(0), (height, width), mode="bilinear", align_corners=False,
                         antialias=antialias)[0]


@torch.no_grad()
def latent_distribution(vae, pixels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (fp32, on ``device``) of the VAE posterior of pixels already in its input range;
    the VAE runs where it is, in its own dtype."""
    vae_device, vae_dtype = module_place(vae)
    dist = vae.encode(pixels.to(vae_device, vae_dtype)).latent_dist
    return dist.mean.float().to(device), dist.std.float().to(device)


@torch.no_grad()
def clip_tokens(clip, key_u8: torch.Tensor, device) -> torch.Tensor:
    """CLIP's ``last_hidden_state`` ``[1,T,D]`` (fp32, on ``device``) of a 640×512 uint8 frame."""
    clip_device, clip_dtype = module_place(clip)
    return clip(pixel_values=clip_pixels(key_u8).to(clip_device, clip_dtype)).last_hidden_state.float().to(device)


@torch.no_grad()
def frozen_condition(clip, vae, key_u8: torch.Tensor, convention: str, device, use_vae: bool = True):
    """A condition frame's frozen encodings: CLIP tokens ``[1,T,D]`` and the VAE posterior (mean,
    std ``[1,4,80,64]``) of its pixels in ``convention``'s range (None, None without ``use_vae``)."""
    tokens = clip_tokens(clip, key_u8, device)
    if not use_vae:
        return tokens, None, None
    mean, std = latent_distribution(vae, vae_inputs(key_u8, convention)[0], device)
    return tokens, mean, std


@torch.no_grad()
def null_condition(clip, vae, convention: str, device, use_vae: bool = True):
    """The sampler's null image, encoded like :func:`frozen_condition`: CLIP of a black frame, the VAE
    posterior of the convention's null input (quirk #5)."""
    black = torch.zeros(1, 3, COND_HEIGHT, COND_WIDTH, dtype=torch.uint8)
    tokens = clip_tokens(clip, black, device)
    if not use_vae:
        return tokens, None, None
    mean, std = latent_distribution(vae, vae_inputs(black, convention)[1], device)
    return tokens, mean, std


def pose_channels(pose_uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Raw UV ``[B,2,H,W]`` → the UNet's 10 pose channels at latent size, exactly as the sampler builds
    them: (x−0.5)/0.5, nearest to latent size, the same pose in all five window slots (a photo has no
    neighbouring frames)."""
    lat = F.interpolate((pose_uv - 0.5) / 0.5, (height // LATENT_SCALE, width // LATENT_SCALE), mode="nearest")
    return lat.repeat(1, POSE_FRAMES, 1, 1)


def dropout_flags(u: float, rate: float) -> tuple[bool, bool]:
    """(drop image, drop pose) of one sample for a uniform draw ``u``: [0, r/3) pose only, [r/3, 2r/3)
    image only, [2r/3, r) both (per sample, quirk #20; r = 0.15 gives the paper's 5 / 5 / 5 %)."""
    drop_pose = u < rate / 3 or rate * 2 / 3 <= u < rate
    drop_image = rate / 3 <= u < rate
    return drop_image, drop_pose


def noise_scheduler(model) -> DDPMScheduler:
    """The training noise schedule: DDPM on the model's scheduler config (SD 1.x's)."""
    return DDPMScheduler.from_config(clean_config(model.scheduler_config))


def noisy_and_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """The noised latents the UNet sees and what it must predict: ε, or v for a v-prediction schedule."""
    noisy = scheduler.add_noise(z0, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(z0, noise, timesteps)
    return noisy, noise


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Stable Diffusion's loss: the mean squared error, in fp32."""
    return F.mse_loss(pred.float(), target.float())
