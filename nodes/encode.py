"""CLIPVAEAdapterEncode: the subject photo → image condition, once per subject (not per frame)."""
from __future__ import annotations

import torch
import comfy.model_management as mm
from comfy_api.latest import io

from ..dreampose.pipeline.conditioning import encode_image_condition
from ..dreampose.settings import COND_HEIGHT, COND_WIDTH, LATENT_MODES, PAPER_SAMPLING
from ..dreampose.errors import DreamPoseError
from ..dreampose.pipeline.images import check_image
from . import device as dev
from .types import DreamPoseCondType, DreamPoseModelType, require_model


def key_frame_from_image(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[1,H,W,3]`` → uint8 ``[3,H,W]``; wrong batch or channels fail with a hint."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise DreamPoseError(f"expected a ComfyUI IMAGE [batch, height, width, channels], got "
                             f"{tuple(getattr(image, 'shape', ()))}")
    if image.shape[0] != 1:
        raise DreamPoseError(f"the image input is a batch of {image.shape[0]} images; DreamPose encodes one key "
                             "frame: pick one with the core 'ImageFromBatch' node")
    if image.shape[-1] == 4:
        raise DreamPoseError("the key frame is RGBA (4 channels); DreamPose needs RGB: drop the alpha with the core "
                             "'Split Image with Alpha' node")
    return check_image(image.movedim(-1, 1))[0]


class CLIPVAEAdapterEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CLIPVAEAdapterEncode",
            display_name="DreamPose Encode Key Frame (CLIP + VAE adapter)",
            category="DreamPose/conditioning",
            description=(
                f"Encodes the subject photo with CLIP ViT-B/32 and the VAE, joined by the DreamPose adapter, into the "
                f"image condition and its null (for dual guidance). The photo is resized to {COND_WIDTH}×{COND_HEIGHT} "
                f"(the adapter's fixed size) whatever the output size. Run once per subject."),
            inputs=[
                DreamPoseModelType.Input("model", tooltip="The DreamPose model from Load DreamPose."),
                io.Image.Input("image", tooltip="The subject's key frame: one RGB image (a batch of one). Best "
                                                "framed like the output, full body, portrait 4:5."),
                io.Combo.Input("conditioning_latent", options=list(LATENT_MODES),
                               default=PAPER_SAMPLING.conditioning_latent,
                               tooltip="How the VAE branch reads the photo: sample (a seeded draw from the VAE "
                                       "posterior, as the authors' code) or mode (its mean, deterministic)."),
                io.Int.Input("seed", default=PAPER_SAMPLING.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=True,
                             tooltip="Seed of the VAE posterior draw ('sample' only); CPU generator, so the same "
                                     "seed gives the same condition on any device."),
            ],
            outputs=[
                DreamPoseCondType.Output(display_name="cond",
                                         tooltip="The image condition and its null, for DualCFGSampler."),
                io.Conditioning.Output(display_name="image",
                                       tooltip="The subject's adapter tokens [1,50,768] as a core CONDITIONING (no "
                                               "pose yet): for DreamPose Apply Pose."),
                io.Conditioning.Output(display_name="null",
                                       tooltip="The null image's tokens as a core CONDITIONING, the unconditional "
                                               "branch of the guidance: for DreamPose Apply Pose."),
            ],
        )

    @classmethod
    def execute(cls, model, image: torch.Tensor, conditioning_latent: str, seed: int) -> io.NodeOutput:
        key = key_frame_from_image(image)  # before any weights move
        model = require_model(model)
        # CLIP and the adapter (small) loaded whole; core loads the VAE as it encodes (partially if need be)
        with dev.borrowed([model.adapter], owner=model, core=[model.clip_vision.patcher]):
            cond = encode_image_condition(model.view(), key, latent_mode=conditioning_latent,
                                          generator=torch.Generator("cpu").manual_seed(seed))
        cond = cond.to(mm.intermediate_device())
        return io.NodeOutput(cond, [[cond.cond, {}]], [[cond.uncond, {}]])
