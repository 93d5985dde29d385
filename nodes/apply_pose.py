"""DreamPoseApplyPose: the subject's conditionings and the pose windows → what core's samplers take.

The pose windows ride on every cond as ``noise_concat`` (core turns it into the UNet's 10 extra
input channels, one window per latent frame); the null branches get explicit zeros. The LATENT has
one frame per pose and ``batch_index`` 0 for all of them, so core's noise nodes give every frame the
same noise: DreamPose's shared start noise, its main device for a steady video.
"""
from __future__ import annotations

import torch
import comfy.model_management as mm
from comfy_api.latest import io

from ..dreampose.errors import DreamPoseError
from ..dreampose.pipeline.sampling import key_frame_latent
from ..dreampose.settings import LATENT_CHANNELS, LATENT_SCALE, START_MODES, VAE_SCALE
from . import core_sampling as cs
from .encode import key_frame_from_image
from .native import VAEView
from .types import DreamPosePoseType, require_windows


def start_latent(start: str, frames: int, height: int, width: int, vae=None, key_frame=None,
                 seed: int = 0) -> dict:
    """The LATENT to sample from: the key frame's latent at the output size (``official``: core's
    sampler noises it to its first sigma) or zeros (``noise``), one frame per pose, shared noise."""
    shape = (1, LATENT_CHANNELS, height // LATENT_SCALE, width // LATENT_SCALE)
    if start == "official":
        if vae is None or key_frame is None:
            raise DreamPoseError("start 'official' begins from the key frame's latent: connect 'vae' and 'key_frame' "
                                 "(the subject photo), or choose start 'noise'")
        key = key_frame_from_image(key_frame)
        generator = torch.Generator("cpu").manual_seed(seed)
        latent = key_frame_latent(VAEView(vae), key, height, width, generator).cpu() / VAE_SCALE
    else:
        latent = torch.zeros(shape)
    samples = latent.to(mm.intermediate_device()).expand(frames, -1, -1, -1).contiguous()
    return {"samples": samples, "batch_index": [0] * frames}


class DreamPoseApplyPose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPoseApplyPose",
            display_name="DreamPose Apply Pose",
            category="DreamPose/conditioning",
            description=(
                "Adds the pose windows to the subject's conditionings for ComfyUI's own samplers: connect positive, "
                "image_only and negative to core DualCFGGuider (cond1, cond2, negative; cfg_conds = s_pose, "
                "cfg_cond2_negative = s_image, style regular) and the latent to SamplerCustomAdvanced. Plain KSampler "
                "works too with positive and negative (then s_image = s_pose = cfg). One latent frame per pose."),
            inputs=[
                io.Conditioning.Input("image", tooltip="CLIPVAEAdapterEncode's 'image' output (the subject's tokens)."),
                io.Conditioning.Input("null",
                                      tooltip="CLIPVAEAdapterEncode's 'null' output (the null image's tokens)."),
                DreamPosePoseType.Input("poses", tooltip="Pose windows from DensePoseWindow5; they set the frame count "
                                                         "and the output size."),
                io.Combo.Input("start", options=list(START_MODES), default="official",
                               tooltip="official: the latent is the key frame's, which the sampler noises to its first "
                                       "step (the authors'; steadier video; needs vae and key_frame). noise: an "
                                       "empty latent, pure noise."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the key frame's latent sample (official start). The sampler's noise has "
                                     "its own seed (RandomNoise)."),
                io.Vae.Input("vae", optional=True, tooltip="The DreamPose VAE (Load DreamPose's VAE output): encodes "
                                                           "the key frame for the official start."),
                io.Image.Input("key_frame", optional=True,
                               tooltip="The subject photo (the image given to CLIPVAEAdapterEncode), for the official "
                                       "start."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive",
                                       tooltip="Image + pose: DualCFGGuider's cond1 (KSampler's positive)."),
                io.Conditioning.Output(display_name="image_only",
                                       tooltip="Image + null pose: DualCFGGuider's cond2."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="Null image + null pose: DualCFGGuider's (and KSampler's) negative."),
                io.Latent.Output(display_name="latent",
                                 tooltip="The start latent, one frame per pose, all frames sharing one noise "
                                         "(batch_index 0): for SamplerCustomAdvanced or KSampler."),
            ],
        )

    @classmethod
    def execute(cls, image: list, null: list, poses, start: str, seed: int, vae=None,
                key_frame=None) -> io.NodeOutput:
        windows = require_windows(poses)
        pose = windows.windows().to(mm.intermediate_device())
        latent = start_latent(start, len(windows), windows.height, windows.width, vae, key_frame, seed)
        positive, image_only, negative = cs.pose_conditionings(image, null, pose)
        return io.NodeOutput(positive, image_only, negative, latent)
