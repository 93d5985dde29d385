"""Pose nodes: DensePose UV files → UV sequence → 5-frame windows at the output size."""
from __future__ import annotations

from comfy_api.latest import io

from ..dreampose.errors import DreamPoseError
from ..dreampose.pipeline.poses import list_uv_files, load_uv_folder, make_pose_windows, smooth_uv
from ..dreampose.settings import MAX_SIZE, MAX_UV_SMOOTHING, PAPER_SAMPLING, check_output_size
from . import folders
from .types import DreamPosePoseType, require_uv


class DreamPoseLoadUV(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPoseLoadUV",
            display_name="DreamPose Load DensePose UV",
            category="DreamPose/poses",
            description=(
                "Loads a folder of DensePose UV frames in the authors' layout (frame_N_densepose.npy, each a "
                "(2, H, W) U/V array), in numeric frame order. Files are read without unpickling."),
            inputs=folders.frame_folder_inputs("frame_N_densepose.npy files", "frames"),
            outputs=[DreamPosePoseType.Output(
                display_name="uv", tooltip="The UV sequence [frames, 2, H, W]; connect it to DensePoseWindow5.")],
        )

    @classmethod
    def validate_inputs(cls, folder: str | None = None) -> bool | str:
        """Fail at queue time, before any model loads, when the folder is wrong."""
        return folders.check_frame_folder(folder, list_uv_files)

    @classmethod
    def execute(cls, folder: str, start: int, count: int) -> io.NodeOutput:
        return io.NodeOutput(load_uv_folder(folders.resolve_folder(folder), start, count))

    @classmethod
    def fingerprint_inputs(cls, folder, start, count):
        """Reload when frames in the folder are added, removed or rewritten."""
        return folders.frame_folder_fingerprint(folder, list_uv_files, start, count)


class DensePoseWindow5(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DensePoseWindow5",
            display_name="DreamPose Pose Windows (5 frames)",
            category="DreamPose/poses",
            description=(
                "Sets the output size and prepares the pose condition: every frame is guided by the poses of frames "
                "i-2..i+2 (10 channels); at the sequence edges the missing neighbours repeat the centre pose."),
            inputs=[
                DreamPosePoseType.Input("uv", tooltip="The UV sequence from DreamPose Load DensePose UV."),
                io.Int.Input("width", default=PAPER_SAMPLING.width, min=64, max=MAX_SIZE, step=64,
                             tooltip="Output width in pixels, a multiple of 64 (DreamPose was trained at 512×640)."),
                io.Int.Input("height", default=PAPER_SAMPLING.height, min=64, max=MAX_SIZE, step=64,
                             tooltip="Output height in pixels, a multiple of 64."),
                io.Int.Input("first_frame", default=0, min=0, max=10 ** 6, optional=True,
                             tooltip="Render from this frame of the sequence (0 = the first). Every window still "
                                     "takes its neighbours from the whole sequence, so a range gives exactly those "
                                     "frames of the whole animation: for previews and splitting long videos."),
                io.Int.Input("frame_count", default=0, min=0, max=10 ** 6, optional=True,
                             tooltip="How many frames to render from first_frame (0 = to the end)."),
                io.Int.Input("uv_smoothing", default=0, min=0, max=MAX_UV_SMOOTHING, optional=True,
                             tooltip="Temporal smoothing of the DensePose UV over ±N frames against estimator "
                                     "jitter (0 = off). Per body part: a limb passing another or a part appearing "
                                     "never mixes UV charts, and steady motion stays where it is."),
            ],
            outputs=[DreamPosePoseType.Output(
                display_name="poses", tooltip="Pose windows at the output size, for DualCFGSampler.")],
        )

    @classmethod
    def validate_inputs(cls, width: int | None = None, height: int | None = None) -> bool | str:
        """Sizes are checked at queue time (naming them here turns off ComfyUI's own min/max check)."""
        # a linked side arrives as None and is checked when the node runs
        width, height = 64 if width is None else width, 64 if height is None else height
        if width > MAX_SIZE or height > MAX_SIZE:
            return f"output size {width}×{height} (W×H) is larger than {MAX_SIZE}×{MAX_SIZE}"
        try:
            check_output_size(height, width)
        except DreamPoseError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, uv, width: int, height: int, first_frame: int = 0, frame_count: int = 0,
                uv_smoothing: int = 0) -> io.NodeOutput:
        windows = make_pose_windows(smooth_uv(require_uv(uv), uv_smoothing), height=height, width=width)
        if first_frame or frame_count:
            windows = windows.select(slice(first_frame, first_frame + frame_count if frame_count else None))
        return io.NodeOutput(windows)
