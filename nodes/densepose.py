"""DensePose nodes: frames → raw DensePose UV (TorchScript export, no detectron2), UV/IUV files in and out.

The model list is the ``densepose`` folder type: ``models/densepose`` (plus any ``densepose:`` entry
of ``extra_model_paths.yaml``) and, when comfyui_controlnet_aux has already downloaded them, its
``ckpts/LayerNorm/DensePose-TorchScript-with-hint-image`` folder, so the exports most users already
have appear without copying. Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import os
import threading

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..dreampose.data.densepose import (attach_part_labels, estimate_uv, list_iuv_files, load_densepose_model,
                                        load_iuv_folder, part_labels_of, save_iuv_folder, visualize)
from ..dreampose.errors import DreamPoseError
from ..dreampose.pipeline.poses import save_uv_folder
from ..dreampose.settings import PERSON_CHOICES, PrepareOptions
from . import folders
from .types import DreamPosePoseType, require_uv

log = logging.getLogger(__name__)

DENSEPOSE = "densepose"
DENSEPOSE_EXTENSIONS = {".torchscript", ".pt"}
# where comfyui_controlnet_aux's DensePose estimator downloads the exports: <pack>/ckpts/<HF repo id>/
AUX_CKPTS = os.path.join("ckpts", "LayerNorm", "DensePose-TorchScript-with-hint-image")
SAVE_FORMATS = ("npy", "iuv_png")
ESTIMATION = PrepareOptions()   # the estimator's defaults are `prepare`'s
LOAD_ORDERS = {"auto": "auto", "iuv (R=I)": "iuv", "vui (B=I, cv2)": "vui"}


def register_densepose_folder() -> None:
    """``densepose``: ``models/densepose`` added to what ``extra_model_paths.yaml`` may have declared
    (extended, never replaced), then comfyui_controlnet_aux's download folder if it exists."""
    folders.extend_folder(DENSEPOSE, [os.path.join(folder_paths.models_dir, DENSEPOSE), *_controlnet_aux_folders()],
                          DENSEPOSE_EXTENSIONS)


def _controlnet_aux_folders() -> list[str]:
    try:
        roots = folder_paths.get_folder_paths("custom_nodes")
    except KeyError:
        return []
    found = []
    for root in roots:
        try:
            packs = sorted(os.listdir(root))
        except OSError:
            continue
        for pack in packs:
            path = os.path.join(root, pack, AUX_CKPTS)
            if os.path.isdir(path):
                found.append(path)
    return found


def densepose_model_options() -> list[str]:
    try:
        return folder_paths.get_filename_list(DENSEPOSE)
    except KeyError:
        return []


# One loaded export, kept on the offload device between runs (a video is usually processed once,
# but re-queuing with another person choice should not reload 100+ MB).
_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _load_cached(path: str):
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        if _CACHE.get("key") != key:
            _CACHE.clear()
            _CACHE["model"] = load_densepose_model(path)
            _CACHE["key"] = key
        return _CACHE["model"]


class DreamPoseDensePose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPoseDensePose",
            display_name="DreamPose DensePose (UV from frames)",
            category="DreamPose/poses",
            description=(
                "Runs a DensePose TorchScript export (densepose_r50_fpn_dl.torchscript or "
                "densepose_r101_fpn_dl.torchscript, the files comfyui_controlnet_aux uses; put them in "
                "models/densepose) on every frame and returns raw DensePose UV as DreamPose needs it: for one "
                "person per frame, U and V of the body part under each pixel (0..1), 0 elsewhere, at the frame "
                "size. No detectron2 needed. Frames without a person give an all-zero pose."),
            inputs=[
                io.Image.Input("images", tooltip="The driving video's frames (an IMAGE batch), one pose per frame."),
                io.Combo.Input("model", options=densepose_model_options(),
                               tooltip="DensePose TorchScript export from models/densepose (or "
                                       "comfyui_controlnet_aux's ckpts folder). R_50 is faster, R_101 slightly more "
                                       "accurate."),
                io.Combo.Input("person", options=list(PERSON_CHOICES), default=ESTIMATION.person,
                               tooltip="Whom to keep when several people are found: the largest box, or the most "
                                       "confident detection (what the authors' script kept)."),
                io.Int.Input("frames_per_batch", default=ESTIMATION.frames_per_batch, min=1, max=256,
                             tooltip="Frames converted and processed per step (progress and cancel are checked "
                                     "between batches). Results do not depend on it."),
                io.Int.Input("detect_resolution", default=ESTIMATION.detect_resolution, min=0, max=2048, step=32,
                             tooltip="Shortest side the frames are resized to for detection (longest at most 1333), "
                                     "as detectron2 does (800). 0 runs at the frame size. The pose is always "
                                     "returned at the frame size."),
            ],
            outputs=[
                DreamPosePoseType.Output(display_name="uv", tooltip="The UV sequence [frames, 2, H, W] for "
                                                                    "DensePoseWindow5 or DreamPose Save UV."),
                io.Image.Output(display_name="preview", tooltip="A picture of the result: red = body part index, "
                                                                "green = U, blue = V."),
            ],
        )

    @classmethod
    def execute(cls, images, model: str, person: str, frames_per_batch: int,
                detect_resolution: int) -> io.NodeOutput:
        path = folder_paths.get_full_path(DENSEPOSE, model)
        if path is None:
            where = ", ".join(folder_paths.get_folder_paths(DENSEPOSE))
            raise DreamPoseError(f"DensePose model {model!r} not found in {where}; refresh the node list (R) or put "
                                 "densepose_r50_fpn_dl.torchscript there")
        estimator = _load_cached(path)
        pbar = comfy.utils.ProgressBar(images.shape[0])

        def on_batch(done: int, total: int) -> None:
            pbar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        device = mm.get_torch_device()
        try:
            if device.type != "cpu":
                mm.free_memory(estimator.size_bytes() * 3 + mm.minimum_inference_memory(), device)
            estimator.to(device)
            result = estimate_uv(estimator, images, person=person, frames_per_batch=frames_per_batch,
                                 detect_resolution=detect_resolution, callback=on_batch)
        finally:
            estimator.to(mm.unet_offload_device())
            mm.soft_empty_cache()
        if result.empty_frames:
            log.warning("DreamPose DensePose: no person found in %d of %d frames (first: %s); their poses are empty",
                        len(result.empty_frames), len(result.people), result.empty_frames[:10])
        uv = attach_part_labels(result.uv, result.labels)
        return io.NodeOutput(uv, visualize(result.uv, result.labels))


class DreamPoseSaveUV(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPoseSaveUV",
            display_name="DreamPose Save DensePose UV",
            category="DreamPose/poses",
            description=(
                "Saves a UV sequence into a folder of ComfyUI's output directory, one file per frame: npy = the "
                "authors' frame_N_densepose.npy (float32 (2, H, W), U then V), read back by DreamPose Load DensePose "
                "UV; iuv_png = detectron2-style frame_N_iuv.png (R = body part 0..24, G = U·255, B = V·255)."),
            inputs=[
                DreamPosePoseType.Input("uv", tooltip="The UV sequence (from DreamPose DensePose or a loader)."),
                io.String.Input("folder", default="dreampose_poses",
                                tooltip="Folder inside ComfyUI's output directory (created if needed)."),
                io.Combo.Input("format", options=list(SAVE_FORMATS), default="npy",
                               tooltip="npy: exact float UV (the authors' files). iuv_png: 8-bit pictures (U/V "
                                       "rounded to 1/255; the body part index is kept when the UV comes straight "
                                       "from DreamPose DensePose, else every body pixel gets part 1)."),
                io.Int.Input("first_number", default=0, min=0, max=10_000_000,
                             tooltip="N of the first file (frame_N_...); the next frames count up from it."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace frame files of this format already in the folder (otherwise a "
                                         "folder that has some is refused, so two runs never mix)."),
            ],
            outputs=[io.String.Output(display_name="folder", tooltip="The folder's full path, e.g. for DreamPose "
                                                                     "Load DensePose UV / Load IUV.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, folder: str | None = None) -> bool | str:
        """A folder outside output/ is refused at queue time, before DensePose runs."""
        if folder is None:  # linked: checked when it runs
            return True
        try:
            output_folder(folder)
        except DreamPoseError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, uv, folder: str, format: str, first_number: int, overwrite: bool) -> io.NodeOutput:
        uv = require_uv(uv)
        path = output_folder(folder)
        if format == "npy":
            files = save_uv_folder(path, uv, start=first_number, overwrite=overwrite)
        elif format == "iuv_png":
            files = save_iuv_folder(path, uv, part_labels_of(uv), start=first_number, overwrite=overwrite)
        else:
            raise DreamPoseError(f"unknown format {format!r}; use one of {SAVE_FORMATS}")
        log.info("DreamPose: saved %d pose frames to %s", len(files), path)
        return io.NodeOutput(path)


def output_folder(folder: str) -> str:
    """A folder inside ComfyUI's output directory (as core's image savers, nothing is written outside it)."""
    name = folder.strip().strip('"').strip("'")
    if not name:
        raise DreamPoseError("no folder given: type a folder name (it is created in ComfyUI's output directory)")
    root = os.path.abspath(folder_paths.get_output_directory())
    path = os.path.abspath(os.path.join(root, os.path.expanduser(name)))
    if os.path.commonpath([root, path]) != root:
        raise DreamPoseError(f"{folder!r} is outside ComfyUI's output directory {root}; poses are only written there")
    return path


class DreamPoseLoadIUV(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPoseLoadIUV",
            display_name="DreamPose Load DensePose IUV pictures",
            category="DreamPose/poses",
            description=(
                "Loads a folder of DensePose IUV PNG pictures (part index I, U·255, V·255), in numeric order of the "
                "numbers in their names, as a UV sequence (U, V in 0..1; 0 where I is 0). Coloured DensePose "
                "visualisations (viridis/parula) are not IUV and are refused."),
            inputs=[
                *folders.frame_folder_inputs("IUV .png pictures", "pictures"),
                io.Combo.Input("channel_order", options=list(LOAD_ORDERS), default="auto",
                               tooltip="Which channel holds the part index: R (detectron2's encoding, what DreamPose "
                                       "Save UV writes), B (an [I,U,V] array written with OpenCV, e.g. Detectron1's "
                                       "*_IUV.png), or auto (the channel that never exceeds 24)."),
            ],
            outputs=[
                DreamPosePoseType.Output(display_name="uv", tooltip="The UV sequence [frames, 2, H, W]; connect it "
                                                                    "to DensePoseWindow5."),
                io.Image.Output(display_name="preview", tooltip="A picture of the poses: red = body part index, "
                                                                "green = U, blue = V."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder: str | None = None) -> bool | str:
        return folders.check_frame_folder(folder, list_iuv_files)  # linked (e.g. from Save UV): checked at run

    @classmethod
    def execute(cls, folder: str, start: int, count: int, channel_order: str) -> io.NodeOutput:
        if channel_order not in LOAD_ORDERS:
            raise DreamPoseError(f"unknown channel order {channel_order!r}; use one of {list(LOAD_ORDERS)}")
        uv, labels = load_iuv_folder(folders.resolve_folder(folder), start, count, LOAD_ORDERS[channel_order])
        return io.NodeOutput(attach_part_labels(uv, labels), visualize(uv, labels))

    @classmethod
    def fingerprint_inputs(cls, folder, start, count, channel_order):
        """Reload when pictures in the folder are added, removed or rewritten."""
        return folders.frame_folder_fingerprint(folder, list_iuv_files, start, count, channel_order)

