"""Evaluate a DreamPose model on prepared test videos, and the paper's Table-2 ablation (§5.2).

For every prepared video (``dataset.find_videos``) one frame is the key frame (the subject photo),
all its DensePose UV files drive the animation and its frames are the ground truth. Optionally the
model is first finetuned on the key frame (UNet + adapter, then the VAE decoder: the paper's full
method, ``finetune.py`` with its defaults except the step counts, the seed and the training size,
which is the sampling size). Frames are sampled with the same seeds for every model, compared with
the ground truth (the key frame itself is left out: it is the input) and summarised per video and
overall (frame-weighted means).

Ablation rows, as the paper's Table 2 (``Ours_smooth`` is not reproduced):

* ``Ours_CLIP`` — the CLIP-only model, full finetune (UNet + adapter, VAE decoder);
* ``Ours_No-VAE-FT`` — the full model, UNet + adapter finetune only;
* ``Ours_1-pose`` — the 1-pose model (pose offsets (0,0,0,0,0)), full finetune;
* ``Ours_full`` — the full model, full finetune.

Every row records in the JSON what actually ran (optimizer steps counted by callback, the pose
offsets and whether every window slot held the centre frame, UNet calls), so a test or a reader can
check the settings instead of trusting the row name.

Pose alignment compares the silhouette of each generated frame (``world.silhouette``: pixels that
differ from the synthetic world's plain background) with the body mask of its driving UV: it is
meaningful only on videos with that plain background, i.e. the synthetic world.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from PIL import Image, UnidentifiedImageError

from ..data import world
from ..data.dataset import find_videos, load_frame, load_pose
from ..errors import DreamPoseError
from ..files.atomic import write_text_atomic
from ..files.weights import is_safetensors, read_metadata
from ..loaders.load import load_dreampose
from ..models.devices import dtype_name
from ..pipeline.animate import animate
from ..pipeline.poses import window_indices
from ..pipeline.sampling import SampleStats
from ..pipeline.video import save_image, save_png_frames
from ..settings import ONE_POSE_OFFSETS, WINDOW_OFFSETS, EvalSettings, FinetuneSettings, check_output_size, vae_settings
from ..training.finetune import finetune_subject, finetune_vae_decoder
from . import metrics as M

ROLES = ("full", "clip", "onepose")
ROWS = ("Ours_CLIP", "Ours_No-VAE-FT", "Ours_1-pose", "Ours_full")
SINGLE_ROW = "model"
POSE_WINDOWS = {1: ONE_POSE_OFFSETS, 5: WINDOW_OFFSETS}
# The paper's Table 2 (UBC Fashion, 256 px), shown beside ours for orientation only.
PAPER_TABLE2 = {
    "Ours_CLIP": {"l1": 0.025, "ssim": 0.882, "vgg": 0.247, "lpips": 0.070},
    "Ours_No-VAE-FT": {"l1": 0.025, "ssim": 0.897, "vgg": 0.210, "lpips": 0.057},
    "Ours_1-pose": {"l1": 0.019, "ssim": 0.899, "vgg": 0.208, "lpips": 0.056},
    "Ours_smooth": {"l1": 0.767, "ssim": 0.758, "vgg": 0.502, "lpips": 0.202},
    "Ours_full": {"l1": 0.019, "ssim": 0.900, "vgg": 0.207, "lpips": 0.056},
}
# metric → which way is better, for the ordering verdict
DIRECTIONS = {"l1": "lower", "ssim": "higher", "vgg": "lower", "lpips": "lower", "pose_iou": "higher",
              "flicker_ratio": "closer to 1", "fid": "lower", "fvd": "lower", "drift": "lower", "key_drift": "lower",
              "texture_drift": "lower", "key_texture_drift": "lower"}
COLUMNS = (("l1", "L1↓"), ("ssim", "SSIM↑"), ("vgg", "VGG↓"), ("lpips", "LPIPS↓"), ("pose_iou", "pose IoU↑"),
           ("shuffled_pose_iou", "shuffled-pose IoU"), ("flicker_ratio", "flicker ratio (→1)"),
           ("drift", "drift↓"), ("key_drift", "key drift↓"), ("texture_drift", "texture drift↓"),
           ("key_texture_drift", "key texture drift↓"), ("fid", "FID↓"), ("fvd", "FVD↓"))
# result key, appearance_drift's part, whether only the generated person's pixels count (texture apart from pose)
DRIFTS = (("drift", "consecutive", False), ("key_drift", "key", False), ("texture_drift", "consecutive", True),
          ("key_texture_drift", "key", True))
NO_SURFACE = "needs the exact body-surface coordinates of every pixel: synthetic-world videos only"
PER_FRAME = ("l1", "ssim", "vgg", "lpips", "pose_iou", "shuffled_pose_iou")
TIE_RTOL = 1e-9
SHEET_COLUMNS = 12
SHEET_TILE_HEIGHT = 192
POSE_NOTE = ("pose IoU: silhouette of each generated frame (pixels differing from the synthetic world's plain "
             "background, world.silhouette) against the body mask of its driving UV (world.body_mask); "
             "shuffled-pose IoU: the same against a deranged order of the poses (no frame keeps its own). "
             "Meaningful only on plain-background videos (the synthetic world).")


# --------------------------------------------------------------------------------------------- rows

@dataclass
class Variant:
    """One row: which bundle, how it is finetuned, which pose window (None: the bundle's)."""

    row: str
    role: str
    bundle: str
    finetune_steps: int
    vae_finetune_steps: int
    pose_window: int | None = None


@dataclass
class VideoPlan:
    video: object          # dataset.VideoFolder
    name: str              # its path relative to the data folder
    count: int             # frames used
    key: int
    height: int            # ground-truth size
    width: int
    out_height: int        # sampling size
    out_width: int


@dataclass
class _Accumulator:
    """Sums for frame-weighted overall means and pooled FID/FVD features."""

    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    flicker: list = field(default_factory=lambda: [0.0, 0.0, 0])
    drift: dict = field(default_factory=lambda: {name: [0.0, 0.0, 0] for name, *_ in DRIFTS})
    inception: list = field(default_factory=lambda: ([], []))
    i3d: list = field(default_factory=lambda: ([], []))

    def add(self, name: str, values) -> None:
        if M.is_skipped(values) or values is None:
            self.skipped.setdefault(name, values)
            return
        values = torch.as_tensor(values, dtype=torch.float64)
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + int(values.numel())


# --------------------------------------------------------------------------------------------- inputs

def parse_ablation(items: list[str]) -> dict[str, str]:
    """``["full=A.safetensors", "clip=B.safetensors", …]`` → {role: path}; ``full`` is required."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not path:
            raise DreamPoseError(f"--ablation {item!r}: expected NAME=FILE with NAME one of {', '.join(ROLES)}")
        if name not in ROLES:
            raise DreamPoseError(f"--ablation: unknown name {name!r}; the names are fixed: full (the full model), "
                                 "clip (the CLIP-only model), onepose (the 1-pose model)")
        if name in out:
            raise DreamPoseError(f"--ablation: {name} given twice")
        out[name] = path
    if "full" not in out:
        raise DreamPoseError("--ablation needs full=FILE (the full model: it gives the Ours_full and "
                             "Ours_No-VAE-FT rows); clip= and onepose= are optional")
    for name, path in out.items():
        if not os.path.isfile(path):
            raise DreamPoseError(f"--ablation {name}: not found: {path}")
    return out


def ablation_variants(bundles: dict[str, str], settings: EvalSettings) -> list[Variant]:
    """The Table-2 rows the given bundles allow, in the paper's order."""
    ft, vae = settings.finetune_steps, settings.vae_finetune_steps
    rows = []
    if "clip" in bundles:
        rows.append(Variant("Ours_CLIP", "clip", bundles["clip"], ft, vae))
    rows.append(Variant("Ours_No-VAE-FT", "full", bundles["full"], ft, 0))
    if "onepose" in bundles:
        rows.append(Variant("Ours_1-pose", "onepose", bundles["onepose"], ft, vae, pose_window=1))
    rows.append(Variant("Ours_full", "full", bundles["full"], ft, vae))
    return rows


def single_variant(bundle: str, settings: EvalSettings) -> list[Variant]:
    return [Variant(SINGLE_ROW, "model", bundle, settings.finetune_steps, settings.vae_finetune_steps)]


def _frame_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as exc:
        raise DreamPoseError(f"{path}: not a readable image ({exc})") from exc


def _uv_shape(path: str) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except ValueError as exc:
        raise DreamPoseError(f"{path}: not a plain numeric .npy array ({exc})") from exc


def plan_videos(data: list[str] | str, settings: EvalSettings, warn=None) -> list[VideoPlan]:
    """Every prepared test video, checked from file headers only (no pixels read): frame count, key
    frame index, one size for all frames and their UV, a sampling size that is a multiple of 64."""
    roots = [data] if isinstance(data, str) else list(data)
    plans = []
    for video in find_videos(roots, warn=warn):
        where = os.path.abspath(video.path)
        root = next((r for r in roots if os.path.commonpath([where, os.path.abspath(r)]) == os.path.abspath(r)),
                    roots[0])
        name = os.path.relpath(video.path, root)
        name = os.path.basename(os.path.abspath(root)) if name == "." else name
        count = min(len(video), settings.max_frames) if settings.max_frames else len(video)
        if count < 2:
            raise DreamPoseError(f"{video.path}: {count} frame(s) used; evaluation needs the key frame and at least "
                                 "one more")
        if not 0 <= settings.key_frame < count:
            raise DreamPoseError(f"--key-frame {settings.key_frame}: {video.path} has only {count} frame(s) in use")
        sizes = {}
        for frame, pose in zip(video.frames[:count], video.poses[:count]):
            hw = _frame_size(frame)
            uv = _uv_shape(pose)
            if uv != (2, *hw):
                raise DreamPoseError(f"ground truth frames and UV of different sizes: {frame} is {hw[1]}x{hw[0]} "
                                     f"(WxH) but {os.path.basename(pose)} has shape {uv} (expected (2, {hw[0]}, "
                                     f"{hw[1]})); prepare the video again")
            sizes.setdefault(hw, frame)
        if len(sizes) > 1:
            raise DreamPoseError(f"{video.path}: frames of different sizes {sorted(sizes)}")
        (height, width), = sizes
        out_h, out_w = settings.height or height, settings.width or width
        try:
            check_output_size(out_h, out_w)
        except DreamPoseError as exc:
            if settings.height and settings.width:      # the size asked for: its own message
                raise
            raise DreamPoseError(f"{video.path}: frames are {width}x{height} (WxH), which cannot be the sampling "
                                 f"size ({exc}); give --width/--height (generated frames are resized to the "
                                 "ground truth for the metrics)") from None
        plans.append(VideoPlan(video, name, count, settings.key_frame, height, width, out_h, out_w))
    return plans


def load_video(plan: VideoPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames ``[F,3,H,W]`` uint8, UV ``[F,2,H,W]`` float32) of the frames in use."""
    frames = torch.stack([load_frame(p) for p in plan.video.frames[:plan.count]])
    uv = torch.stack([load_pose(p) for p in plan.video.poses[:plan.count]])
    return frames, uv


# --------------------------------------------------------------------------------------------- model

def load_model(bundle: str, *, clip: str | None, base: str | None = None, vae: str | None = None,
               device=None, dtype=None):
    """One DreamPose bundle → (model placed on ``device``/``dtype``, its safetensors metadata).

    The one place models are loaded, so bundles that carry their own CLIP/VAE can make ``clip``
    optional here alone.
    """
    meta = check_bundle(bundle, clip=clip)
    model = load_dreampose(clip=clip, dreampose=bundle, base=base, vae=vae,
                           dtype=(dtype or torch.float32) if device is not None else None)
    if device is not None:
        model.place(device, dtype or torch.float32)
    return model, meta


def check_bundle(bundle: str, *, clip: str | None) -> dict:
    """What :func:`load_model` needs, checked from file headers: the bundle exists (its safetensors
    metadata is returned, ``{}`` for other formats) and CLIP is given or carried by the bundle."""
    if not os.path.isfile(bundle):
        raise DreamPoseError(f"DreamPose bundle not found: {bundle}")
    meta = read_metadata(bundle) if is_safetensors(bundle) else {}
    if not clip and "clip_config" not in meta:
        raise DreamPoseError(f"--clip is required: {os.path.basename(bundle)} carries no CLIP ViT-B/32 vision model "
                             "(give a folder or a .safetensors file)")
    return meta


def check_variants(variants: list[Variant], *, clip: str | None) -> None:
    """Every row's bundle and pose window, before any weights are read."""
    for v in variants:
        pose_window_of(check_bundle(v.bundle, clip=clip), v.bundle, v.pose_window)


def pose_window_of(meta: dict, bundle: str, forced: int | None = None) -> int:
    """The pose window a bundle was trained with: metadata ``pose_window`` ("1" or "5"), default 5.

    ``forced`` (the 1-pose row) must agree with the metadata when the metadata says something.
    """
    raw = meta.get("pose_window")
    window = None
    if raw is not None:
        try:
            window = int(json.loads(raw) if isinstance(raw, str) else raw)
        except (ValueError, TypeError):
            window = None
        if window not in POSE_WINDOWS:
            raise DreamPoseError(f"{bundle}: metadata pose_window={raw!r}; expected 1 or 5")
    if forced is not None:
        if window is not None and window != forced:
            raise DreamPoseError(f"{bundle}: given as the {forced}-pose model, but its metadata says "
                                 f"pose_window={window}")
        return forced
    return window or 5


def _vae_token_weight(model) -> float:
    """Largest |weight| the adapter gives the VAE tokens (0 for a CLIP-only adapter)."""
    w = model.adapter.linear1.weight
    return float(w[:, model.adapter.clip_tokens:].detach().abs().max())


_META_SKIP = ("unet_config", "vae_config", "adapter_config", "scheduler_config")


# --------------------------------------------------------------------------------------------- running

def _clip_only(variant: Variant) -> bool:
    """A CLIP-only model stays CLIP-only through its subject finetune (VAE-token weights held at zero)."""
    return variant.role == "clip" or read_metadata(variant.bundle).get("conditioning") == "clip"


class _StepCounter:
    def __init__(self):
        self.steps, self.last_loss = 0, None

    def __call__(self, step, total, loss):
        self.steps, self.last_loss = step, float(loss)


def _finetune(model, key_u8, key_uv, variant: Variant, settings: EvalSettings, height: int, width: int,
              cache: dict) -> tuple[object, dict]:
    """UNet+adapter then VAE-decoder finetune as the variant asks; returns (model, what ran).

    The UNet finetune is deterministic (seeded), so rows of one bundle with the same step count share
    it (``cache``) instead of training it twice.
    """
    ran = {"unet_finetune_steps": 0, "vae_finetune_steps": 0, "finetune_s": 0.0}
    if variant.finetune_steps:
        key = ("unet", variant.finetune_steps)
        if key not in cache:
            counter = _StepCounter()
            extra = {"lr": settings.finetune_lr} if settings.finetune_lr else {}
            fs = FinetuneSettings(steps=variant.finetune_steps, seed=settings.seed, height=height, width=width,
                                  clip_only=_clip_only(variant), **extra)
            t0 = time.perf_counter()
            tuned = finetune_subject(model, [key_u8], [key_uv], fs, callback=counter)
            cache[key] = (tuned, counter.steps, counter.last_loss, time.perf_counter() - t0)
        model, steps, loss, seconds = cache[key]
        ran.update(unet_finetune_steps=steps, unet_finetune_last_loss=loss, finetune_s=seconds)
    if variant.vae_finetune_steps:
        counter = _StepCounter()
        extra = {"lr": settings.vae_finetune_lr} if settings.vae_finetune_lr else {}
        vs = vae_settings(steps=variant.vae_finetune_steps, seed=settings.seed, height=height, width=width, **extra)
        t0 = time.perf_counter()
        model = finetune_vae_decoder(model, [key_u8], vs, callback=counter)
        ran.update(vae_finetune_steps=counter.steps, vae_finetune_last_loss=counter.last_loss,
                   finetune_s=ran["finetune_s"] + time.perf_counter() - t0)
    return model, ran


@torch.no_grad()
def generate(model, key_u8: torch.Tensor, uv: torch.Tensor, settings: EvalSettings, height: int, width: int,
             offsets: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """The real pipeline (:func:`dreampose.pipeline.animate.animate`), seeded as ``animate`` is: one
    CPU generator, conditioning draws first. Returns frames ``[F,3,H,W]`` 0..1 and what ran."""
    stats = SampleStats()
    frames = torch.empty(uv.shape[0], 3, height, width)
    for chunk in animate(model, key_u8, uv, settings.sampling(height, width), stats=stats, offsets=offsets):
        frames[chunk.frames] = chunk.images.permute(0, 3, 1, 2)
    indices = window_indices(uv.shape[0], offsets)   # the table the pose windows were built from
    ran = {"pose_offsets": list(offsets),
           "pose_window_all_centre": bool((indices == torch.arange(uv.shape[0]).unsqueeze(1)).all()),
           "unet_calls": stats.unet_calls, "image_evaluations": stats.image_evaluations,
           "sampled_size": [width, height]}
    return frames, ran


def _segments(count: int, key: int) -> list[range]:
    """The frame ranges left when the key frame is taken out (consecutive frames stay together)."""
    return [r for r in (range(key), range(key + 1, count)) if len(r)]


def world_parts(plan: VideoPlan, uv: torch.Tensor) -> torch.Tensor | None:
    """The exact part index ``[F,H,W]`` of a synthetic-world video's frames in use (rendered again from its
    marker), or None when the folder is not the world's or its UV is not the rendering's."""
    try:
        truth = world.rendered_truth(plan.video.info())
    except (OSError, ValueError, DreamPoseError):
        return None
    if truth is None or truth.uv.shape[0] < plan.count or not torch.equal(truth.uv[:plan.count], uv):
        return None
    return truth.parts[:plan.count]


def video_metrics(pred: torch.Tensor, gt_u8: torch.Tensor, uv: torch.Tensor, key: int, nets: M.FeatureNets,
                  acc: _Accumulator, shuffle_seed: int = 0, parts: torch.Tensor | None = None) -> dict:
    """Metrics of one video, the key frame left out; adds to ``acc`` for the overall numbers. ``parts``: the
    exact part index of every pixel (synthetic world), for the appearance drift."""
    gt = gt_u8.float() / 255
    if pred.shape[-2:] != gt.shape[-2:]:
        pred = F.interpolate(pred, gt.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        pred = pred.clamp(0, 1)
    keep = [i for i in range(gt.shape[0]) if i != key]
    p, g = pred[keep], gt[keep]
    out, per_frame = {}, {}
    per_frame["l1"] = M.l1(p, g)
    per_frame["ssim"] = M.ssim(p, g)
    per_frame["vgg"] = M.vgg_distance(p, g, nets.vgg) if nets.vgg is not None else nets.skipped["vgg"]
    per_frame["lpips"] = M.lpips_distance(p, g, nets.lpips) if nets.lpips is not None else nets.skipped["lpips"]
    gen_masks, pose_masks = world.silhouette(p), world.body_mask(uv[keep])
    align = M.pose_alignment(gen_masks, pose_masks, shuffle_seed)
    per_frame["pose_iou"] = torch.tensor(align["per_frame"], dtype=torch.float64)
    if align["permutation"] is None:
        per_frame["shuffled_pose_iou"] = M.skipped("shuffled_pose_iou", "one evaluated frame: no derangement")
    else:
        per_frame["shuffled_pose_iou"] = M.mask_iou(gen_masks, pose_masks[align["permutation"]])
        out["pose_permutation"] = [keep[i] for i in align["permutation"]]
    for name, values in per_frame.items():
        out[name] = values if M.is_skipped(values) else float(values.mean())
        acc.add(name, values)
    # flicker on consecutive pairs that do not touch the key frame
    pairs = [t for t in range(gt.shape[0] - 1) if key not in (t, t + 1)]
    fl = M.flicker(pred, gt, pairs)
    out["flicker"] = fl
    out["flicker_ratio"] = fl["ratio"]
    if fl["pairs"]:
        acc.flicker[0] += fl["generated"] * fl["pairs"]
        acc.flicker[1] += fl["ground_truth"] * fl["pairs"]
        acc.flicker[2] += fl["pairs"]
    # appearance drift on exact correspondences: consecutive pairs as the flicker, and the key frame (the
    # input photo) against every other frame
    if parts is None:
        for name, *_ in DRIFTS:
            out[name] = M.skipped(name, NO_SURFACE)
    else:
        # the person masks of every frame (the key frame's among them is not used: key_pairs leaves it out)
        person = world.silhouette(pred)
        drift, texture = (M.appearance_drift(pred, gt, parts, uv, key_frame=gt[key], key_parts=parts[key],
                                             key_uv=uv[key], pairs=pairs, key_pairs=keep, masks=masks)
                          for masks in (None, person))
        out["appearance_drift"], out["appearance_drift_on_person"] = drift, texture
        for name, part, on_person in DRIFTS:
            d = (texture if on_person else drift)[part]
            out[name] = d["generated"]
            if d["pairs"]:
                acc.drift[name][0] += d["generated"] * d["pairs"]
                acc.drift[name][1] += d["ground_truth"] * d["pairs"]
                acc.drift[name][2] += d["pairs"]
    if nets.inception is not None:
        acc.inception[0].append(M.inception_features(p, nets.inception))
        acc.inception[1].append(M.inception_features(g, nets.inception))
    if nets.i3d is not None:
        for seg in _segments(gt.shape[0], key):
            clips_p = M.i3d_clips(pred[seg.start:seg.stop])
            if clips_p.shape[0]:
                acc.i3d[0].append(M.i3d_features(clips_p, nets.i3d))
                acc.i3d[1].append(M.i3d_features(M.i3d_clips(gt[seg.start:seg.stop]), nets.i3d))
    out["frames_evaluated"] = len(keep)
    return out


def overall_metrics(acc: _Accumulator, nets: M.FeatureNets) -> dict:
    """Frame-weighted means over every evaluated frame of every video; FID/FVD over the pooled sets."""
    out = {}
    for name in PER_FRAME:
        if name in acc.counts:
            out[name] = acc.sums[name] / acc.counts[name]
        else:
            out[name] = acc.skipped.get(name, M.skipped(name, "no frames"))
    gen, real, pairs = acc.flicker
    out["flicker"] = {"generated": gen / pairs if pairs else None, "ground_truth": real / pairs if pairs else None,
                      "pairs": pairs}
    out["flicker_ratio"] = (gen / real) if pairs and real > 0 else None
    out["flicker"]["ratio"] = out["flicker_ratio"]
    for name, *_ in DRIFTS:
        gen, real, pairs = acc.drift[name]
        out[name] = gen / pairs if pairs else M.skipped(name, NO_SURFACE)
        out[name + "_floor"] = real / pairs if pairs else None
    if nets.inception is None:
        out["fid"] = nets.skipped["fid"]
    else:
        a, b = torch.cat(acc.inception[0]), torch.cat(acc.inception[1])
        out["fid"] = (M.frechet_distance_from_features(a, b) if a.shape[0] >= 2
                      else M.skipped("fid", f"{a.shape[0]} evaluated frame(s); FID needs at least 2"))
        out["fid_frames"] = int(a.shape[0])
    if nets.i3d is None:
        out["fvd"] = nets.skipped["fvd"]
    else:
        clips = sum(x.shape[0] for x in acc.i3d[0])
        if clips >= 2:
            out["fvd"] = M.frechet_distance_from_features(torch.cat(acc.i3d[0]), torch.cat(acc.i3d[1]))
        else:
            out["fvd"] = M.skipped("fvd", f"{clips} clip(s) of {M.FVD_CLIP} consecutive evaluated frames; FVD "
                                          "needs at least 2 (longer videos or more of them)")
        out["fvd_clips"] = clips
    return out


# --------------------------------------------------------------------------------------------- the run

def evaluate(variants: list[Variant], videos: list[VideoPlan], settings: EvalSettings, *, clip: str | None,
             base: str | None = None, vae: str | None = None, device=None, dtype=None,
             nets: M.FeatureNets | None = None, out: str | None = None, log=None) -> dict:
    """Run every variant on every video; returns the result dict written to ``metrics.json``.

    Bundles are loaded once each (rows of the same bundle share it, and its UNet finetune).
    """
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    nets = nets or M.load_feature_nets(discover=False)
    log = log or (lambda msg: None)
    result = {
        "mode": "ablation" if variants[0].row != SINGLE_ROW else "single",
        "settings": asdict(settings), "device": str(device), "dtype": dtype_name(dtype),
        "weights": {"clip": clip, "base": base, "vae": vae},
        "feature_metrics": nets.status(),
        "notes": [POSE_NOTE, ("Key frame excluded from every metric (it is the input); flicker uses the "
                              "consecutive pairs that do not touch it.")],
        "videos": [v.name for v in videos],
        "rows": {},
    }
    if nets.inception is not None:
        result["notes"].append("FID uses torchvision's Inception v3, not the TF-FID network: values are not "
                               "comparable with published FIDs.")
    if result["mode"] == "ablation" and settings.vae_finetune_steps == 0:
        result["notes"].append("--vae-finetune-steps 0: Ours_No-VAE-FT and Ours_full ran the same settings.")
    results_by_row = {}
    for role in dict.fromkeys(v.role for v in variants):
        group = [v for v in variants if v.role == role]
        bundle = group[0].bundle
        log(f"loading {bundle} ({role}) …")
        t0 = time.perf_counter()
        model, meta = load_model(bundle, clip=clip, base=base, vae=vae, device=device, dtype=dtype)
        load_s = time.perf_counter() - t0
        bundle_meta = {k: v for k, v in meta.items() if k not in _META_SKIP}
        rows = {}
        for v in group:
            window = pose_window_of(meta, bundle, v.pose_window)
            rows[v.row] = {"ran": {"bundle": bundle, "role": role, "bundle_metadata": bundle_meta,
                                   "pose_window": window, "pose_offsets": list(POSE_WINDOWS[window]),
                                   "finetune_steps": v.finetune_steps, "vae_finetune_steps": v.vae_finetune_steps,
                                   "load_s": load_s, "adapter_vae_token_weight_max": _vae_token_weight(model)},
                           "videos": {}, "_acc": _Accumulator()}
        for plan in videos:
            frames_u8, uv = load_video(plan)
            key_u8, key_uv = frames_u8[plan.key], uv[plan.key]
            parts = world_parts(plan, uv)
            cache = {}
            # rows without a VAE finetune first: they reuse the UNet finetune before a VAE one is added
            for v in sorted(group, key=lambda v: v.vae_finetune_steps):
                row = rows[v.row]
                log(f"{v.row}: {plan.name} ({plan.count} frames, key {plan.key})")
                tuned, ran = _finetune(model, key_u8, key_uv, v, settings, plan.out_height, plan.out_width, cache)
                ran["adapter_vae_token_weight_max"] = _vae_token_weight(tuned)
                t0 = time.perf_counter()
                pred, gen_ran = generate(tuned, key_u8, uv, settings, plan.out_height, plan.out_width,
                                         tuple(row["ran"]["pose_offsets"]))
                ran.update(gen_ran, sample_s=time.perf_counter() - t0, seed=settings.seed)
                del tuned
                record = {"frames": plan.count, "key_frame": plan.key, "size": [plan.width, plan.height],
                          "ran": ran}
                record.update(video_metrics(pred, frames_u8, uv, plan.key, nets, row["_acc"], settings.shuffle_seed,
                                            parts))
                row["videos"][plan.name] = record
                if settings.save_frames and out:
                    _save_frames(out, v.row, plan, pred, frames_u8)
            cache.clear()
        for name, row in rows.items():
            acc = row.pop("_acc")
            row["overall"] = overall_metrics(acc, nets)
            results_by_row[name] = row
        del model
    order = ROWS if result["mode"] == "ablation" else (SINGLE_ROW,)
    result["rows"] = {name: results_by_row[name] for name in order if name in results_by_row}
    if result["mode"] == "ablation":
        table = {name: row["overall"] for name, row in result["rows"].items()}
        result["verdict"] = ordering_verdict(table)
        result["notes"] += _ablation_notes(result["rows"], settings)
    return result


def _ablation_notes(rows: dict, settings: EvalSettings) -> list[str]:
    """Caveats that follow from what actually ran."""
    notes = []
    if settings.finetune_steps == 0:
        notes.append("--finetune-steps 0: no row was subject-finetuned (the paper's rows all are).")
    clip_row = rows.get("Ours_CLIP")
    if clip_row and clip_row["ran"]["adapter_vae_token_weight_max"] == 0:
        drift = max(rec["ran"]["adapter_vae_token_weight_max"] for rec in clip_row["videos"].values())
        if drift > 0:
            notes.append(f"Ours_CLIP: the CLIP-only bundle gives the VAE tokens zero weight, but after the subject "
                         f"finetune the largest VAE-token weight is {drift:.3g}, so the finetuned row is not "
                         "strictly CLIP-only (the finetune should have held them at zero: clip_only).")
    return notes


# --------------------------------------------------------------------------------------------- verdict

def _score(value, direction: str):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    if direction == "lower":
        return float(value)
    if direction == "higher":
        return -float(value)
    return abs(float(value) - 1.0)


def ordering_verdict(table: dict[str, dict], reference: str = "Ours_full",
                     metrics: tuple[str, ...] = ("l1", "ssim", "vgg", "lpips", "pose_iou", "flicker_ratio"),
                     rtol: float = TIE_RTOL) -> dict:
    """Per metric: does the paper's ordering hold here, i.e. is ``reference`` best or tied with the best
    of the other rows? Computed from ``table`` (row → metric → value). ``holds`` is True/False, or
    None when the metric was not computed or there is no other row. Ties: equal within ``rtol``."""
    out = {}
    for metric in metrics:
        direction = DIRECTIONS[metric]
        mine = _score(table.get(reference, {}).get(metric), direction)
        others = {row: _score(vals.get(metric), direction) for row, vals in table.items() if row != reference}
        others = {row: s for row, s in others.items() if s is not None}
        entry = {"direction": direction, "holds": None, "value": table.get(reference, {}).get(metric)}
        if mine is None:
            entry["text"] = f"{metric}: not computed for {reference}"
        elif not others:
            entry["text"] = f"{metric}: no other row to compare with"
        else:
            best_row = min(others, key=others.get)
            best = others[best_row]
            tol = rtol * max(1.0, abs(best), abs(mine))
            better = sorted(row for row, s in others.items() if s < mine - tol)
            tied = sorted(row for row, s in others.items() if abs(s - mine) <= tol)
            entry.update(holds=not better, better_rows=better, tied_rows=tied,
                         best_other={"row": best_row, "value": table[best_row][metric]})
            if better:
                entry["text"] = (f"{metric}: does NOT hold — {', '.join(better)} better than {reference} "
                                 f"({direction} is better)")
            elif tied:
                entry["text"] = f"{metric}: holds — {reference} tied with {', '.join(tied)} for best"
            else:
                entry["text"] = f"{metric}: holds — {reference} best (next: {best_row})"
        out[metric] = entry
    return out


# --------------------------------------------------------------------------------------------- outputs

def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return "skipped"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _columns(rows: dict) -> list[tuple[str, str]]:
    """All columns, FID/FVD and the drifts only when some row computed them."""
    cols = []
    for key, title in COLUMNS:
        optional = key in ("fid", "fvd") or key in {name for name, *_ in DRIFTS}
        if optional and all(isinstance(r["overall"].get(key), str) for r in rows.values()):
            continue
        cols.append((key, title))
    return cols


def markdown_report(result: dict) -> str:
    rows = result["rows"]
    cols = _columns(rows)
    s = result["settings"]
    lines = ["# DreamPose evaluation", ""]
    lines.append(f"{len(result['videos'])} video(s); {s['sampler']} {s['steps']} steps, s_image {s['s_image']:g}, "
                 f"s_pose {s['s_pose']:g}, seed {s['seed']}; key frame {s['key_frame']}; finetune "
                 f"{s['finetune_steps']} UNet+adapter / {s['vae_finetune_steps']} VAE-decoder steps; "
                 f"{result['device']} {result['dtype']}.")
    lines.append("")
    head = "| row | " + " | ".join(t for _, t in cols) + " |"
    lines += [head, "|" + "---|" * (len(cols) + 1)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row["overall"].get(k)) for k, _ in cols) + " |")
    if result.get("verdict"):
        lines += ["", "## Does the paper's ordering hold? (Ours_full best or tied, computed)", ""]
        lines += [f"- {'✔' if e['holds'] else ('✘' if e['holds'] is False else '·')} {e['text']}"
                  for e in result["verdict"].values()]
        lines += ["", "The paper's Table 2 (UBC Fashion, 256 px; for orientation, not comparable):", "",
                  "| row | L1↓ | SSIM↑ | VGG↓ | LPIPS↓ |", "|---|---|---|---|---|"]
        for name, vals in PAPER_TABLE2.items():
            lines.append(f"| {name} | {vals['l1']:.3f} | {vals['ssim']:.3f} | {vals['vgg']:.3f} "
                         f"| {vals['lpips']:.3f} |")
    lines += ["", "## Per video", ""]
    lines += ["| row | video | frames | " + " | ".join(t for _, t in cols if t not in ("FID↓", "FVD↓")) + " |"]
    per_cols = [(k, t) for k, t in cols if k not in ("fid", "fvd")]
    lines += ["|" + "---|" * (len(per_cols) + 3)]
    for name, row in rows.items():
        for video, rec in row["videos"].items():
            lines.append(f"| {name} | {video} | {rec['frames_evaluated']} | "
                         + " | ".join(_fmt(rec.get(k)) for k, _ in per_cols) + " |")
    skipped = [v for row in rows.values() for v in row["overall"].values() if isinstance(v, str)]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in dict.fromkeys(result["notes"] + skipped)]
    return "\n".join(lines) + "\n"


def write_reports(result: dict, out: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    js, md = os.path.join(out, "metrics.json"), os.path.join(out, "metrics.md")
    write_text_atomic(js, json.dumps(result, indent=1, default=str) + "\n")
    write_text_atomic(md, markdown_report(result))
    return js, md


def _safe(name: str) -> str:
    return name.replace(os.sep, "__").replace("/", "__")


def _save_frames(out: str, row: str, plan: VideoPlan, pred: torch.Tensor, gt_u8: torch.Tensor) -> None:
    """Generated PNGs and a contact sheet: generated row above the ground truth, the key frame's
    column framed in red (it is the input, not a prediction)."""
    folder = os.path.join(out, "frames", row, _safe(plan.name))
    save_png_frames(pred.permute(0, 2, 3, 1), folder)
    count = pred.shape[0]
    n = min(count, SHEET_COLUMNS)
    cols = sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})   # evenly spread, ends included
    h, w = gt_u8.shape[-2:]
    th = min(SHEET_TILE_HEIGHT, h)
    tw = max(1, round(w * th / h))
    sheet = Image.new("RGB", (tw * len(cols), th * 2), (255, 255, 255))
    if pred.shape[-2:] != (h, w):
        pred = F.interpolate(pred, (h, w), mode="bilinear", align_corners=False, antialias=True)
    gen_u8 = (pred.clamp(0, 1) * 255).round().to(torch.uint8)
    for j, i in enumerate(cols):
        for r, src in enumerate((gen_u8, gt_u8)):
            tile = Image.fromarray(src[i].permute(1, 2, 0).numpy()).resize((tw, th), Image.BILINEAR)
            if i == plan.key:
                arr = np.asarray(tile).copy()
                arr[:2], arr[-2:], arr[:, :2], arr[:, -2:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
                tile = Image.fromarray(arr)
            sheet.paste(tile, (j * tw, r * th))
    save_image(np.asarray(sheet.convert("RGB")), os.path.join(out, "frames", row, _safe(plan.name) + "_sheet.png"))
