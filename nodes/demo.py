"""Demo nodes: the shipped demo DreamPose and a synthetic person to animate, so a workflow runs with
no downloaded model and no input files."""
from __future__ import annotations

from comfy_api.latest import io

from ..dreampose.data.densepose import visualize
from ..dreampose.demo.model import demo_scene, load_demo_model
from ..dreampose.errors import DreamPoseError
from ..dreampose.settings import (DEMO_FRAMES, DEMO_HEIGHT, DEMO_WIDTH, MOTIONS, NODE_DTYPE_CHOICES,
                                  VAE_DTYPE_CHOICES, check_output_size)
from .loader import to_native
from .types import DreamPoseModelType, DreamPosePoseType


class DreamPoseDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPoseDemoModel",
            display_name="Load DreamPose Demo Model",
            category="DreamPose/demo",
            description=(
                "The small DreamPose shipped inside this pack (a few MB), trained with `python -m dreampose train` on "
                "the synthetic world. It animates synthetic people only (DreamPose Synthetic Person); for photos use "
                "Load DreamPose with the released weights. Nothing is downloaded."),
            inputs=[
                io.Combo.Input("dtype", options=list(NODE_DTYPE_CHOICES), default="auto",
                               tooltip="Precision of the UNet's weights, as in Load DreamPose."),
                io.Combo.Input("vae_dtype", options=list(VAE_DTYPE_CHOICES), default="auto",
                               tooltip="Precision of the VAE, as in Load DreamPose."),
            ],
            outputs=[
                DreamPoseModelType.Output(display_name="model", tooltip="The demo DreamPose model."),
                io.Model.Output(display_name="MODEL", tooltip="Its UNet as a core MODEL, as Load DreamPose's."),
                io.ClipVision.Output(display_name="CLIP_VISION", tooltip="Its CLIP vision as a core CLIP_VISION."),
                io.Vae.Output(display_name="VAE", tooltip="Its VAE as a core VAE."),
            ],
        )

    @classmethod
    def execute(cls, dtype: str, vae_dtype: str) -> io.NodeOutput:
        bundle = to_native(load_demo_model(), dtype, vae_dtype)
        return io.NodeOutput(bundle, bundle.unet, bundle.clip_vision, bundle.vae)


class DreamPoseSyntheticPerson(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPoseSyntheticPerson",
            display_name="DreamPose Synthetic Person",
            category="DreamPose/demo",
            description=(
                "A person from the synthetic world's test split (never seen by the demo model in training): their "
                "key frame, a driving motion as exact DensePose UV, and the ground truth of that motion to compare "
                "the animation with."),
            inputs=[
                io.Int.Input("subject", default=0, min=0, max=100_000,
                             tooltip="Which test-split person (outfit, colours, pattern)."),
                io.Combo.Input("motion", options=list(MOTIONS), default=MOTIONS[0],
                               tooltip="The motion family of the driving sequence."),
                io.Int.Input("frames", default=DEMO_FRAMES, min=2, max=1024, tooltip="Number of frames of the motion."),
                io.Int.Input("width", default=DEMO_WIDTH, min=64, max=2048, step=64,
                             tooltip="Frame width in pixels (the demo model was trained at 128)."),
                io.Int.Input("height", default=DEMO_HEIGHT, min=64, max=2048, step=64,
                             tooltip="Frame height in pixels (the demo model was trained at 192)."),
            ],
            outputs=[
                io.Image.Output(display_name="key_frame", tooltip="The person standing still: the subject photo."),
                DreamPosePoseType.Output(display_name="uv",
                                         tooltip="The driving DensePose UV sequence; connect it to DensePoseWindow5."),
                io.Image.Output(display_name="ground_truth", tooltip="The person really moving along the poses."),
                io.Image.Output(display_name="pose_preview", tooltip="The UV sequence as pictures."),
                DreamPosePoseType.Output(display_name="key_uv",
                                         tooltip="The key frame's own DensePose UV, for Subject Finetune."),
            ],
        )

    @classmethod
    def validate_inputs(cls, width: int | None = None, height: int | None = None) -> bool | str:
        try:
            if width is not None and height is not None:
                check_output_size(height, width)
        except DreamPoseError as exc:   # shown at queue time, before any model loads
            return str(exc)
        return True

    @classmethod
    def execute(cls, subject: int, motion: str, frames: int, width: int, height: int) -> io.NodeOutput:
        scene = demo_scene(frames, subject, motion, height, width)
        key = scene["key_frame"].permute(1, 2, 0).unsqueeze(0).float() / 255
        truth = scene["truth"].permute(0, 2, 3, 1).contiguous()
        return io.NodeOutput(key, scene["uv"], truth, visualize(scene["uv"]), scene["key_uv"].unsqueeze(0))
