"""The pack's socket types. Namespaced so they never connect to another pack's look-alikes.

* ``DREAMPOSE_MODEL``: a :class:`nodes.native.NativeModel`: the core MODEL, CLIP_VISION and VAE plus
  the adapter, the conditioning convention and the scheduler config; the dtypes the loader chose
  live in its ``info``.
* ``DREAMPOSE_COND``: a :class:`dreampose.pipeline.conditioning.ImageCondition` (key frame and null embeddings).
* ``DREAMPOSE_POSE``: a DensePose UV sequence (``torch.Tensor`` ``[F,2,H,W]``) or, after
  ``DensePoseWindow5``, a :class:`dreampose.pipeline.poses.PoseWindows`. One type for both keeps the pose
  chain to one colour in the UI; the nodes check which of the two they got.
"""
import torch
from comfy_api.latest import io

from ..dreampose.errors import DreamPoseError
from ..dreampose.pipeline.poses import PoseWindows
from .native import DreamPoseSD15, NativeModel

DreamPoseModelType = io.Custom("DREAMPOSE_MODEL")
DreamPoseCondType = io.Custom("DREAMPOSE_COND")
DreamPosePoseType = io.Custom("DREAMPOSE_POSE")


def require_uv(poses) -> torch.Tensor:
    """A raw UV sequence, or a clear error saying what was connected instead."""
    if isinstance(poses, PoseWindows):
        raise DreamPoseError("these poses are already 5-frame windows: connect the UV sequence from "
                             "'DreamPose Load DensePose UV' here, not the output of DensePoseWindow5")
    if not isinstance(poses, torch.Tensor):
        raise DreamPoseError(f"expected a DensePose UV sequence, got {type(poses).__name__}")
    return poses


def require_windows(poses) -> PoseWindows:
    """Pose windows, or a clear error when the raw UV sequence was wired straight in."""
    if isinstance(poses, torch.Tensor):
        raise DreamPoseError("these poses are a raw UV sequence: pass them through DensePoseWindow5 first "
                             "(it sets the output size and builds the 5-frame windows)")
    if not isinstance(poses, PoseWindows):
        raise DreamPoseError(f"expected DreamPose pose windows, got {type(poses).__name__}")
    return poses


def require_model(model) -> NativeModel:
    """The DreamPose bundle, or a clear error saying what was connected instead."""
    if not isinstance(model, NativeModel):
        raise DreamPoseError(f"expected a DreamPose model from Load DreamPose, got {type(model).__name__}")
    return model


def require_core_unet(unet):
    """A core MODEL of a DreamPose UNet (any LoRA or patch on it), or a clear error."""
    config = getattr(getattr(unet, "model", None), "model_config", None)
    if not isinstance(config, DreamPoseSD15):
        raise DreamPoseError("core_model must be the DreamPose UNet: Load DreamPose's MODEL output, through any LoRA "
                             "loader or model patch (a Stable Diffusion checkpoint's MODEL has no pose channels)")
    return unet
