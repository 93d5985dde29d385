"""The official DreamPose inference math, re-derived in plain PyTorch for parity tests.

Written from docs/official-code.md §2–§4 (and a reading of the authors' test.py / pipeline), in the
authors' structure: one frame at a time, PIL-based CLIP preprocessing, the pose tensor rebuilt and
interpolated inside every step, embeddings ``[uncond, cond, cond]`` and poses ``[0, pose, 0]``.
Only the random draws are made explicit (a generator instead of the global RNG) so that a test can
feed both implementations the same numbers. Nothing here is used by the package.
"""
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import PNDMScheduler
from PIL import Image


def clip_processor():
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        return CLIPImageProcessorPil()
    except ImportError:  # transformers 4.x: the default processor is the PIL one the authors used
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor()


def official_pose_input(pose_arrays, frame):
    """test.py: poses frame-2..frame+2, a missing one replaced by the centre; bilinear → (x-.5)/.5."""
    parts = []
    for k in range(frame - 2, frame + 3):
        arr = pose_arrays[k] if 0 <= k < len(pose_arrays) else pose_arrays[frame]
        dp = F.interpolate(torch.from_numpy(arr.astype("float32")).unsqueeze(0), (640, 512),
                           mode="bilinear").squeeze(0)
        parts.append((dp - 0.5) / 0.5)
    return torch.cat(parts, 0).unsqueeze(0)


@torch.no_grad()
def official_embeddings(key_image: Image.Image, clip, vae, adapter, generator):
    """pipeline._encode_image: CLIP via the processor; VAE on raw 0..255 pixels; null image built (W,H,3)."""
    proc = clip_processor()
    uncond_image = torch.zeros((key_image.size[0], key_image.size[1], 3))
    clip_cond = clip(pixel_values=proc(images=[key_image], return_tensors="pt").pixel_values).last_hidden_state
    clip_uncond = clip(pixel_values=proc(images=[uncond_image], return_tensors="pt").pixel_values).last_hidden_state
    image_tensor = torch.tensor(np.array([np.array(key_image).transpose((2, 0, 1))])).float()
    vae_cond = vae.encode(image_tensor).latent_dist.sample(generator=generator) * 0.18215
    uncond_tensor = torch.tensor(np.array([np.array(uncond_image).transpose((2, 0, 1))])).float()
    vae_uncond = vae.encode(uncond_tensor).latent_dist.sample(generator=generator) * 0.18215
    cond = adapter(clip_cond, vae_cond)
    uncond = adapter(clip_uncond, vae_uncond)
    return torch.cat([uncond, cond, cond])


@torch.no_grad()
def official_frame_latents(unet, embeddings, pose, x_t, scheduler_config, steps, s1, s2):
    """The pipeline's denoising loop for one frame, from the given x_T; returns the final latents."""
    scheduler = PNDMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    latents = x_t.clone()
    for t in scheduler.timesteps:
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 3), t)
        _, _, h, w = latent_model_input.shape
        pose_input = torch.cat([torch.zeros(pose.shape), pose, torch.zeros(pose.shape)])
        latent_model_input = torch.cat((latent_model_input, F.interpolate(pose_input, (h, w))), 1)
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=embeddings).sample
        uncond, full, img_only = noise_pred.chunk(3)
        noise_pred = uncond + s1 * (img_only - uncond) + s2 * (full - img_only)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents
