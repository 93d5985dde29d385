"""DensePose UV from video frames, with a TorchScript export of DensePose R-CNN (no detectron2).

DreamPose is conditioned on raw DensePose UV: per frame a ``[2,H,W]`` float map, U then V (≈0..1 on
the body), exactly 0 on the background and on non-body pixels inside the person's box. The authors
made it with detectron2's ``apply_net`` and pasted the first detection's chart UV into a zero canvas at
its box (docs/official-code.md §3). This module makes the same quantity from the TorchScript exports
ComfyUI users already have (``densepose_r50_fpn_dl.torchscript`` / ``densepose_r101_fpn_dl.torchscript``
from comfyui_controlnet_aux, HF ``LayerNorm/DensePose-TorchScript-with-hint-image``).

The export (a detectron2 ``TracingAdapter`` trace of ``GeneralizedRCNN``) is called as
``model(image)`` with ``image`` a ``[3,H,W]`` **uint8** tensor and returns the tuple
``(pred_boxes [N,4] XYXY in input pixels, coarse_segm [N,K,S,S], fine_segm [N,25,S,S], u [N,25,S,S],
v [N,25,S,S])`` — raw per-detection chart outputs, detections ordered by decreasing score (detectron2
keeps the order of torchvision's ``batched_nms``). The model normalises with detectron2's pixel
mean/std, which are in **BGR** order: the DensePose configs keep detectron2's default
``INPUT.FORMAT = "BGR"`` and ``apply_net`` feeds ``cv2.imread`` images, so we flip ComfyUI's RGB frames
to BGR (comfyui_controlnet_aux feeds RGB; ``channel_order="rgb"`` reproduces that). The trace does no
resizing; detectron2's predictor resizes the shortest side to 800 (at most 1333 on the long side)
before the network, so we do the same by default and map the boxes back to the frame.

Post-processing (our own, equivalent to detectron2's chart-result conversion): for the chosen
detection, the integer box is ``(int(x0), int(y0), int(x1-x0), int(y1-y0))`` (truncation, each side
at least 1); coarse and fine segmentation and U/V are resized bilinearly (align_corners False) to the
box; the part label is the fine argmax where the coarse argmax is foreground, else 0; U/V are read
from the label's channel and are 0 where the label is 0. The box-sized result is pasted into a zero
canvas, clipped at the frame border (the official script could overflow there). Only one person is
kept: the largest box by default, or the best-scoring one (the authors' choice: their first instance).

The export also references ``torchvision::nms``: ``import torchvision`` must have loaded its compiled
operators before ``torch.jit.load``, or loading fails with an "Unknown builtin op" error that we
translate into what to install.

A TorchScript file is a program, not just weights: load only files from a source you trust.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DreamPoseError
from ..pipeline.poses import prepare_frame_folder, select_range
from ..settings import DETECT_SHORT_SIDE, PERSON_CHOICES, check_choice

log = logging.getLogger(__name__)

PART_COUNT = 24                      # body parts 1..24; 0 = background (the "I" of IUV)
CHANNEL_ORDERS = ("bgr", "rgb")
DETECT_MAX_SIDE = 1333               # detectron2 INPUT.MAX_SIZE_TEST
SIZE_DIVISIBILITY = 32               # the FPN backbone's input multiple (res5 stride)
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)  # detectron2 MODEL.PIXEL_MEAN, BGR like INPUT.FORMAT
IUV_ORDERS = ("auto", "iuv", "vui")  # iuv: R=I,G=U,B=V (detectron2); vui: R=V,G=U,B=I (cv2-written IUV arrays)
_IUV_NAME = re.compile(r"^frame_(\d+)_iuv\.png$")
_NUMBER = re.compile(r"(\d+)")


# ---------------------------------------------------------------------------------------------- model

@dataclass
class Detections:
    """Raw chart outputs of one image in float32 (boxes and scores on the CPU, charts where the model
    left them); ``scores`` only when the export gives them."""

    boxes: torch.Tensor            # [N,4] XYXY, frame pixels
    coarse: torch.Tensor           # [N,K,S,S] coarse segmentation logits (K ≥ 2, channel 0 = background)
    fine: torch.Tensor             # [N,25,S,S] fine segmentation logits (channel 0 = background)
    u: torch.Tensor                # [N,25,S,S]
    v: torch.Tensor                # [N,25,S,S]
    scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]


def _torchvision_problem() -> str | None:
    """Import torchvision so its compiled operators (``torchvision::nms``) are registered; say why not."""
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision.* when its C++ ops load)
    except Exception as exc:  # a broken install raises all sorts of things
        return f"'import torchvision' failed ({type(exc).__name__}: {exc})"
    try:
        torch.ops.torchvision.nms  # noqa: B018
    except (AttributeError, RuntimeError):
        return "torchvision imported but its compiled operators did not load (a torchvision build that does " \
               f"not match torch {torch.__version__})"
    return None


class DensePoseModel:
    """A loaded TorchScript DensePose export and the device it runs on.

    Calling it with a ``[3,H,W]`` uint8 image (in the export's colour order) returns
    :class:`Detections`. If the graph cannot run on the chosen device (traces can pin tensors to the
    CPU; MPS lacks ops), it falls back to the CPU once, with a warning, and stays there.
    """

    def __init__(self, module: torch.jit.ScriptModule, path: str | None = None):
        self.module = module
        self.path = path
        self.device = torch.device("cpu")
        self.cpu_only = False  # set once the graph failed elsewhere: later runs go straight to the CPU

    def to(self, device: torch.device | str) -> "DensePoseModel":
        device = torch.device("cpu") if self.cpu_only else torch.device(device)
        if device != self.device:
            try:
                self.module.to(device)
                self.device = device
            except RuntimeError as exc:
                log.warning("DensePose model cannot move to %s (%s); running on the CPU", device, exc)
                self._on_cpu()
        return self

    def _on_cpu(self) -> None:
        self.cpu_only = True
        self.module.to("cpu")
        self.device = torch.device("cpu")

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.module.parameters()) + list(self.module.buffers()))

    def __call__(self, image_chw_u8: torch.Tensor) -> Detections:
        try:
            with torch.no_grad():
                out = self.module(image_chw_u8.to(self.device))
        except RuntimeError as exc:
            if self.device.type == "cpu":
                raise DreamPoseError(f"the DensePose model failed on this frame: {exc}") from exc
            log.warning("DensePose model failed on %s (%s); falling back to the CPU", self.device,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._on_cpu()
            return self(image_chw_u8)
        return parse_outputs(out)


def parse_outputs(out) -> Detections:
    """The export's outputs → :class:`Detections`.

    Accepts the comfyui_controlnet_aux export's tuple ``(boxes, coarse, fine, u, v)`` and the dict of
    dajes/DensePose-TorchScript exports (``pred_boxes``, ``scores``, ``pred_densepose_coarse_segm``,
    ``pred_densepose_fine_segm``, ``pred_densepose_u``, ``pred_densepose_v``).
    """
    scores = None
    if isinstance(out, dict):
        try:
            boxes, coarse, fine, u, v = (out[k] for k in ("pred_boxes", "pred_densepose_coarse_segm",
                                                          "pred_densepose_fine_segm", "pred_densepose_u",
                                                          "pred_densepose_v"))
        except KeyError as exc:
            raise DreamPoseError(f"the DensePose model returned a dict without {exc}; expected a DensePose chart "
                                 "export (pred_boxes, pred_densepose_coarse_segm, ...)") from None
        scores = out.get("scores")
    elif isinstance(out, (tuple, list)) and len(out) == 5:
        boxes, coarse, fine, u, v = out
    else:
        kind = f"a {len(out)}-tuple" if isinstance(out, (tuple, list)) else type(out).__name__
        raise DreamPoseError(f"the DensePose model returned {kind}; expected (pred_boxes, coarse_segm, fine_segm, u, "
                             "v) as the densepose_r50/r101_fpn_dl.torchscript exports do")
    tensors = [t.detach().float() for t in (boxes, coarse, fine, u, v)]
    boxes, coarse, fine, u, v = tensors
    boxes = boxes.cpu()  # small; the charts stay where the model left them
    n = boxes.shape[0] if boxes.ndim == 2 else -1
    ok = (boxes.ndim == 2 and boxes.shape[1] == 4 and all(t.ndim == 4 and t.shape[0] == n for t in tensors[1:])
          and coarse.shape[1] >= 2 and fine.shape[1] >= 2 and u.shape == fine.shape and v.shape == fine.shape)
    if not ok:
        raise DreamPoseError("the DensePose model's outputs have unexpected shapes "
                             f"{[tuple(t.shape) for t in tensors]}; expected boxes [N,4], coarse [N,K,S,S], "
                             "fine/u/v [N,25,S,S] (a DensePose chart export, not a CSE one)")
    if scores is not None:
        scores = scores.detach().float().cpu().reshape(-1)
        if scores.shape[0] != n:
            scores = None
    return Detections(boxes, coarse, fine, u, v, scores)


def load_densepose_model(path: str, device: torch.device | str | None = None) -> DensePoseModel:
    """``torch.jit.load`` a DensePose TorchScript export onto the CPU, then (if asked) onto ``device``.

    Never downloads. A file that is not TorchScript (a pickle, a state dict) is refused without
    being unpickled: TorchScript's own loader reads only its archive format.
    """
    if not os.path.isfile(path):
        raise DreamPoseError(f"DensePose model not found: {path!r} (put densepose_r50_fpn_dl.torchscript in "
                             "models/densepose)")
    problem = _torchvision_problem()
    try:
        with warnings.catch_warnings():  # torch ≥ 2.9 deprecates TorchScript; these exports exist only as such
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location="cpu")
    except RuntimeError as exc:
        text = str(exc)
        if "torchvision" in text:
            raise DreamPoseError(
                f"{os.path.basename(path)} needs torchvision's compiled operators (torchvision::nms) and they are "
                f"not available: {problem or 'unknown reason'}. Install the torchvision build that matches your "
                "torch (same version pairing and CUDA/CPU variant), then restart ComfyUI.") from exc
        raise DreamPoseError(f"{path}: not a TorchScript DensePose export ({text.splitlines()[0] if text else exc}); "
                             "use densepose_r50_fpn_dl.torchscript or densepose_r101_fpn_dl.torchscript") from exc
    except Exception as exc:  # zip errors, pickled junk: report, never execute
        raise DreamPoseError(f"{path}: not a TorchScript file ({type(exc).__name__}: {exc})") from exc
    module.eval()
    model = DensePoseModel(module, path)
    if device is not None:
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------------- frames

def frames_to_uint8(images) -> torch.Tensor:
    """A ComfyUI IMAGE-like batch ``[F,H,W,3]`` (or one ``[H,W,3]``), float 0..1 or uint8 → uint8 ``[F,H,W,3]``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise DreamPoseError(f"expected an image batch [frames, H, W, 3], got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DreamPoseError(f"expected RGB frames [frames, H, W, 3], got shape {tuple(images.shape)}"
                             + ("; drop the alpha channel first" if images.ndim == 4 and images.shape[-1] == 4 else ""))
    if images.shape[0] == 0:
        raise DreamPoseError("no frames to run DensePose on")
    if images.dtype == torch.uint8:
        return images
    return _to_u8(images)


def _to_u8(images: torch.Tensor) -> torch.Tensor:
    images = images.float()
    if not torch.isfinite(images).all():
        raise DreamPoseError("the frames contain NaN or infinite values")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def detection_size(height: int, width: int, short_side: int = DETECT_SHORT_SIDE,
                   max_side: int = DETECT_MAX_SIDE) -> tuple[int, int]:
    """The size detectron2's test-time resize gives a frame: shortest side → ``short_side``, the
    longest at most ``max_side``, rounded to pixels. ``short_side`` 0 keeps the frame's size."""
    if short_side <= 0:
        return height, width
    scale = short_side / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max_side > 0 and max(new_h, new_w) > max_side:
        shrink = max_side / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def model_input(frame_hwc_u8: torch.Tensor, size: tuple[int, int], channel_order: str = "bgr") -> torch.Tensor:
    """One RGB frame ``[H,W,3]`` uint8 → the export's input ``[3,h',w']`` uint8: resized to ``size``,
    colour order set, padded at the bottom/right to multiples of 32 with the model's pixel mean."""
    if channel_order not in CHANNEL_ORDERS:
        raise DreamPoseError(f"unknown channel order {channel_order!r}; use one of {CHANNEL_ORDERS}")
    chw = frame_hwc_u8.permute(2, 0, 1)
    if channel_order == "bgr":
        chw = chw.flip(0)
    if tuple(chw.shape[-2:]) != tuple(size):
        # bilinear with a widened kernel when shrinking, as PIL's resize in detectron2's ResizeTransform
        resized = F.interpolate(chw[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        chw = resized[0].round().clamp(0, 255).to(torch.uint8)
    height, width = chw.shape[-2:]
    pad_h, pad_w = -height % SIZE_DIVISIBILITY, -width % SIZE_DIVISIBILITY
    if pad_h or pad_w:
        # detectron2 pads the normalised image to a multiple of 32 with zeros, i.e. with the pixel mean:
        # do it here (bottom/right, so box coordinates are unchanged) so a trace never meets odd sizes
        mean = PIXEL_MEAN_BGR if channel_order == "bgr" else PIXEL_MEAN_BGR[::-1]
        padded = torch.tensor([round(m) for m in mean], dtype=torch.uint8, device=chw.device).view(3, 1, 1)
        padded = padded.expand(3, height + pad_h, width + pad_w).clone()
        padded[:, :height, :width] = chw
        chw = padded
    return chw.contiguous()


# ---------------------------------------------------------------------------------------------- charts

def int_box(box_xyxy: torch.Tensor) -> tuple[int, int, int, int]:
    """XYXY float box → detectron2's integer XYWH: every value truncated toward zero, w and h at least 1."""
    x0, y0, x1, y1 = (float(c) for c in box_xyxy)
    return int(x0), int(y0), max(int(x1 - x0), 1), max(int(y1 - y0), 1)


def select_person(det: Detections, person: str = "largest") -> int | None:
    """Index of the detection to keep, or None when there is nobody.

    ``largest``: the biggest box area (first on ties). ``highest_score``: the best score when the
    export gives scores, else the first detection (exports list detections by decreasing score; the
    authors kept that one).
    """
    check_choice(person, PERSON_CHOICES, "person choice")
    if len(det) == 0:
        return None
    if person == "highest_score":
        return int(det.scores.argmax()) if det.scores is not None else 0
    wh = (det.boxes[:, 2:] - det.boxes[:, :2]).clamp(min=0)
    return int((wh[:, 0] * wh[:, 1]).argmax())


def _linear_taps(out_size: int, in_size: int,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of a 1-D linear resize ``in_size → out_size`` with align_corners
    False: source position ``(i + 0.5)·in/out − 0.5``, clamped at 0 — the sampling of
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` that detectron2 resizes charts with."""
    pos = ((torch.arange(out_size, dtype=torch.float32, device=device) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    lo = pos.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = pos - lo
    return lo, hi, 1 - frac, frac


def chart_to_box(coarse: torch.Tensor, fine: torch.Tensor, u: torch.Tensor, v: torch.Tensor, height: int, width: int,
                 rows: slice = slice(None), cols: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """One detection's charts (``[K,S,S]``, ``[C,S,S]`` ×3) at box size ``height×width`` → (labels
    ``[h,w]`` long, uv ``[2,h,w]``), for the ``rows``/``cols`` of the box that are wanted (the visible part).

    detectron2's definition: every channel resized bilinearly to the box, label = argmax of the fine
    logits where the argmax of the coarse logits is foreground (> 0) else 0, U/V read from the label's
    channel and 0 where the label is 0. Computed without ever holding all channels at box size: the
    resize is two linear passes (horizontal on the small charts, then vertical per channel), the
    argmax runs over channels (the first maximum wins, as ``argmax``), and U/V are interpolated only
    in the label's channel. Memory: a few box-sized maps, whatever the number of parts.
    """
    parts, device = fine.shape[0], fine.device
    taps_cols = _linear_taps(width, fine.shape[-1], device)
    lo, hi, w0, w1 = (t[rows] for t in _linear_taps(height, fine.shape[-2], device))
    w0, w1 = w0[:, None], w1[:, None]

    def horizontal(chart: torch.Tensor, taps) -> torch.Tensor:  # [C,S,Sw] → [C,S,w]: small
        c_lo, c_hi, c_w0, c_w1 = (t[cols] for t in taps)
        chart = chart.float()
        return chart.index_select(-1, c_lo) * c_w0 + chart.index_select(-1, c_hi) * c_w1

    def vertical(channel: torch.Tensor, r_lo, r_hi, r_w0, r_w1) -> torch.Tensor:  # [S,w] → [h,w]
        return channel.index_select(0, r_lo).mul_(r_w0).addcmul_(channel.index_select(0, r_hi), r_w1)

    # coarse: foreground where some non-background channel beats channel 0 strictly (argmax > 0)
    c_taps = [t[rows] for t in _linear_taps(height, coarse.shape[-2], device)]
    c_taps = c_taps[:2] + [c_taps[2][:, None], c_taps[3][:, None]]
    coarse_h = horizontal(coarse, _linear_taps(width, coarse.shape[-1], device))
    background = vertical(coarse_h[0], *c_taps)
    body = vertical(coarse_h[1], *c_taps)
    for k in range(2, coarse_h.shape[0]):
        body = torch.maximum(body, vertical(coarse_h[k], *c_taps))
    foreground = body > background

    fine_h = horizontal(fine, taps_cols)
    best = vertical(fine_h[0], lo, hi, w0, w1)
    labels = torch.zeros(best.shape, dtype=torch.long, device=device)
    for part in range(1, parts):
        value = vertical(fine_h[part], lo, hi, w0, w1)
        better = value > best
        best = torch.maximum(best, value, out=best)
        labels.masked_fill_(better, part)
    labels.mul_(foreground)

    # U/V: the same two passes, evaluated only in each pixel's label channel
    n_rows, n_cols = labels.shape
    src_rows, src_cols = fine_h.shape[-2], fine_h.shape[-1]
    at = labels * (src_rows * src_cols) + torch.arange(n_cols, device=device)[None, :]
    top, bottom = at + lo[:, None] * src_cols, at + hi[:, None] * src_cols
    uv = torch.empty((2, n_rows, n_cols), dtype=torch.float32, device=device)
    for i, chart in enumerate((u, v)):
        flat = horizontal(chart, taps_cols).reshape(-1)
        uv[i] = flat[top] * w0 + flat[bottom] * w1
    return labels, uv * (labels > 0)


def paste_person(det: Detections, index: int | None, height: int, width: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen detection's UV and labels in a zero ``(2,H,W)`` / ``(H,W)`` canvas (CPU) at its box,
    clipped to the frame; the chart arithmetic runs on ``device`` (default: where the charts are)."""
    uv = torch.zeros((2, height, width), dtype=torch.float32)
    labels = torch.zeros((height, width), dtype=torch.uint8)
    if index is None:
        return uv, labels
    x, y, w, h = int_box(det.boxes[index])
    fx0, fy0, fx1, fy1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if fx0 >= fx1 or fy0 >= fy1:  # the box lies entirely outside the frame
        return uv, labels
    visible_rows, visible_cols = slice(fy0 - y, fy1 - y), slice(fx0 - x, fx1 - x)  # only what lies in the frame
    charts = [t[index].to(device) if device is not None else t[index] for t in (det.coarse, det.fine, det.u, det.v)]
    box_labels, box_uv = chart_to_box(*charts, h, w, visible_rows, visible_cols)
    uv[:, fy0:fy1, fx0:fx1] = box_uv.cpu()
    labels[fy0:fy1, fx0:fx1] = box_labels.to(torch.uint8).cpu()
    return uv, labels


# ---------------------------------------------------------------------------------------------- sequences

@dataclass
class DensePoseResult:
    """A frame sequence's DensePose: ``uv`` ``[F,2,H,W]`` float32 (the DreamPose pose), ``labels``
    ``[F,H,W]`` uint8 part index 0..24, and how many people each frame had."""

    uv: torch.Tensor
    labels: torch.Tensor
    people: list[int]

    @property
    def empty_frames(self) -> list[int]:
        return [i for i, n in enumerate(self.people) if n == 0]


def estimate_frame(model: DensePoseModel, frame_hwc_u8: torch.Tensor, person: str = "largest",
                   detect_resolution: int = DETECT_SHORT_SIDE, max_resolution: int = DETECT_MAX_SIDE,
                   channel_order: str = "bgr") -> tuple[torch.Tensor, torch.Tensor, int]:
    """One RGB uint8 frame ``[H,W,3]`` → (uv ``[2,H,W]``, labels ``[H,W]``, number of people detected)."""
    height, width = frame_hwc_u8.shape[:2]
    size = detection_size(height, width, detect_resolution, max_resolution)
    det = model(model_input(frame_hwc_u8.to(model.device), size, channel_order))
    if size != (height, width) and len(det):
        scale = torch.tensor([width / size[1], height / size[0]] * 2)
        det.boxes = det.boxes * scale
    uv, labels = paste_person(det, select_person(det, person), height, width, model.device)
    return uv, labels, len(det)


def estimate_uv(model: DensePoseModel, images, person: str = "largest", frames_per_batch: int = 8,
                detect_resolution: int = DETECT_SHORT_SIDE, max_resolution: int = DETECT_MAX_SIDE,
                channel_order: str = "bgr",
                callback: Callable[[int, int], None] | None = None) -> DensePoseResult:
    """DensePose UV for every frame of ``images`` (IMAGE-like ``[F,H,W,3]``, float 0..1 or uint8).

    Frames are converted in chunks of ``frames_per_batch`` (the export takes one image per call), so
    only one chunk of uint8 frames exists besides the result; ``callback(frames_done, frames_total)``
    runs after each chunk (report progress or raise there to cancel).
    """
    if frames_per_batch < 1:
        raise DreamPoseError(f"frames_per_batch must be at least 1, got {frames_per_batch}")
    check_choice(person, PERSON_CHOICES, "person choice")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images.unsqueeze(0)
    frames_to_uint8(images[:1] if isinstance(images, torch.Tensor) else images)  # shape/dtype check first
    total, height, width = images.shape[0], images.shape[1], images.shape[2]
    uv = torch.zeros((total, 2, height, width), dtype=torch.float32)
    labels = torch.zeros((total, height, width), dtype=torch.uint8)
    people = []
    for start in range(0, total, frames_per_batch):
        chunk = frames_to_uint8(images[start:start + frames_per_batch])
        for i, frame in enumerate(chunk):
            uv[start + i], labels[start + i], n = estimate_frame(model, frame, person, detect_resolution,
                                                                 max_resolution, channel_order)
            people.append(n)
        del chunk
        if callback is not None:
            callback(min(start + frames_per_batch, total), total)
    return DensePoseResult(uv, labels, people)


def visualize(uv: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """A preview ``[F,H,W,3]`` in 0..1: R = part index / 24 (or 1 on the body when no labels), G = U, B = V.

    The colours of a detectron2 IUV picture with the part index stretched to be visible."""
    if uv.ndim == 3:
        uv = uv.unsqueeze(0)
    body = labels.float() / PART_COUNT if labels is not None else (uv != 0).any(dim=1).float()
    if body.ndim == 2:
        body = body.unsqueeze(0)
    return torch.stack([body, uv[:, 0].clamp(0, 1), uv[:, 1].clamp(0, 1)], dim=-1)


# ---------------------------------------------------------------------------------------------- IUV pictures

def iuv_file_name(number: int) -> str:
    return f"frame_{number}_iuv.png"


def to_iuv(uv: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """UV ``[2,H,W]`` (+ labels ``[H,W]``) → detectron2's quantised IUV ``[3,H,W]`` uint8: I = part index,
    U and V ×255 rounded (clamped to 0..1 first). Without labels, I is 1 wherever U or V is non-zero
    (the part is unknown; readers only use I to tell body from background)."""
    if labels is None:
        labels = (uv != 0).any(dim=0).to(torch.uint8)
    quantised = (uv.float().clamp(0, 1) * 255).round().to(torch.uint8)
    quantised = quantised * (labels > 0)
    return torch.cat([labels.to(torch.uint8)[None], quantised], dim=0)


def save_iuv_folder(folder: str, uv: torch.Tensor, labels: torch.Tensor | None = None, start: int = 0,
                    overwrite: bool = False, order: str = "iuv") -> list[str]:
    """Write ``frame_N_iuv.png`` (N from ``start``) as 8-bit RGB PNGs.

    ``order="iuv"`` (default): R = I (part 0..24), G = U·255, B = V·255 — the layout detectron2 itself
    encodes IUV results in (``quantize_densepose_chart_result`` + PIL). ``"vui"``: R = V, G = U, B = I —
    what ``cv2.imwrite`` of an ``[I,U,V]`` array produces (Detectron1's ``*_IUV.png``). U/V lose at
    most 0.5/255 to rounding; values outside 0..1 are clamped.
    """
    if order not in ("iuv", "vui"):
        raise DreamPoseError(f"unknown IUV channel order {order!r}; use 'iuv' or 'vui'")
    uv = _check_uv_batch(uv)
    if labels is not None and tuple(labels.shape) != (uv.shape[0], *uv.shape[-2:]):
        raise DreamPoseError(f"part labels {tuple(labels.shape)} do not match the UV {tuple(uv.shape)}")
    if start < 0:
        raise DreamPoseError(f"the first frame number must be 0 or more, got {start}")
    prepare_frame_folder(folder, _IUV_NAME, overwrite)
    paths = []
    for i in range(uv.shape[0]):
        iuv = to_iuv(uv[i], None if labels is None else labels[i])
        if order == "vui":
            iuv = iuv.flip(0)
        path = os.path.join(folder, iuv_file_name(start + i))
        Image.fromarray(iuv.permute(1, 2, 0).contiguous().numpy()).save(path)  # uint8 HxWx3 → RGB
        paths.append(path)
    return paths


def list_iuv_files(folder: str) -> list[str]:
    """The PNG pictures of a folder in numeric order (by the last number in each name, then by name)."""
    if not os.path.isdir(folder):
        raise DreamPoseError(f"IUV folder not found: {folder!r} (expected a folder of IUV .png pictures)")
    found = []
    for name in os.listdir(folder):
        if name.lower().endswith(".png") and not name.startswith("."):
            numbers = _NUMBER.findall(name)
            found.append((int(numbers[-1]) if numbers else -1, name))
    if not found:
        raise DreamPoseError(f"no .png IUV pictures in {folder!r}")
    return [os.path.join(folder, name) for _, name in sorted(found)]


def _read_png(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA"):
                raise DreamPoseError(f"{path}: a {im.mode} picture; an IUV picture is 8-bit RGB (I, U, V)")
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise DreamPoseError(f"{path}: not a readable PNG ({exc})") from exc


def detect_iuv_order(pictures: list[np.ndarray]) -> str:
    """``iuv`` or ``vui``: the part-index channel never exceeds 24, U/V (×255) do on a body."""
    red = max(int(p[..., 0].max()) for p in pictures)
    blue = max(int(p[..., 2].max()) for p in pictures)
    if blue <= PART_COUNT < red:
        return "vui"
    return "iuv"


def from_iuv(pictures: np.ndarray | torch.Tensor, order: str = "iuv") -> tuple[torch.Tensor, torch.Tensor]:
    """IUV pictures ``[F,H,W,3]`` uint8 → (uv ``[F,2,H,W]`` float 0..1, labels ``[F,H,W]`` uint8);
    U/V are 0 wherever I is 0."""
    arr = torch.as_tensor(np.asarray(pictures))
    if order == "vui":
        arr = arr.flip(-1)
    labels = arr[..., 0].clone()
    if int(labels.max()) > PART_COUNT:
        raise DreamPoseError(f"the part-index channel has values up to {int(labels.max())} (>24): these are not "
                             "IUV pictures in the chosen channel order (a coloured DensePose visualisation is not IUV)")
    uv = arr[..., 1:].permute(0, 3, 1, 2).float() / 255
    return uv * (labels > 0).unsqueeze(1), labels


def load_iuv_folder(folder: str, start: int = 0, count: int = 0,
                    order: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A folder of IUV PNGs → (uv ``[F,2,H,W]``, labels ``[F,H,W]``), frames in numeric order.

    ``order``: ``iuv`` (R = I, detectron2), ``vui`` (B = I, cv2-written), or ``auto`` (whichever
    channel stays within 0..24 is I; ``iuv`` when both do)."""
    if order not in IUV_ORDERS:
        raise DreamPoseError(f"unknown IUV channel order {order!r}; use one of {IUV_ORDERS}")
    files = select_range(list_iuv_files(folder), start, count, folder)
    pictures = [_read_png(p) for p in files]
    shapes = {p.shape for p in pictures}
    if len(shapes) != 1:
        raise DreamPoseError(f"{folder!r}: IUV pictures have different sizes {sorted(shapes)}")
    if order == "auto":
        order = detect_iuv_order(pictures)
    return from_iuv(np.stack(pictures), order)


def _check_uv_batch(uv: torch.Tensor) -> torch.Tensor:
    if not isinstance(uv, torch.Tensor):
        uv = torch.as_tensor(np.asarray(uv))
    if uv.ndim == 3:
        uv = uv.unsqueeze(0)
    if uv.ndim != 4 or uv.shape[1] != 2 or uv.shape[0] == 0:
        raise DreamPoseError(f"expected DensePose UV [frames, 2, H, W], got shape {tuple(uv.shape)}")
    return uv.detach().float().cpu()


# attached to the UV tensor a node outputs so a later save can write real part indices
PART_LABELS_ATTR = "dreampose_part_labels"


def attach_part_labels(uv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Remember the part index map on the UV tensor itself (lost by any operation that makes a new tensor)."""
    setattr(uv, PART_LABELS_ATTR, labels)
    return uv


def part_labels_of(uv: torch.Tensor) -> torch.Tensor | None:
    """The part labels attached by :func:`attach_part_labels`, when they still match ``uv``."""
    labels = getattr(uv, PART_LABELS_ATTR, None)
    if isinstance(labels, torch.Tensor) and uv.ndim == 4 and tuple(labels.shape) == (uv.shape[0], *uv.shape[-2:]):
        return labels
    return None
