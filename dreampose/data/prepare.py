"""Videos → prepared video folders (frames + DensePose UV): what ``python -m dreampose prepare`` does.

Sources are found below one folder: video files (``.mp4 .mov .avi .webm .mkv .m4v``, decoded with
OpenCV) and folders of frame images (``frame_N.png`` and the like, with the authors'
``frame_N_densepose.npy`` beside them or not). Each becomes one folder in the layout of
:mod:`dreampose.data.dataset` under the same relative path, so the UBC Fashion split
``ROOT/train/X.mp4`` becomes ``OUT/train/X/``.

Frames are resized first (``height``/``width``) and DensePose runs on the frame exactly as it is
written, so every UV file has its frame's size and aligns with it pixel for pixel. An existing
``.npy`` is used instead of the estimator; when frames are resized it is resized with
nearest-neighbour sampling, because interpolating UV across a part border invents coordinates
that belong to neither part.

Work is resumable at frame granularity: each file is written under a temporary name and renamed,
a frame counts as done when both its PNG and its ``.npy`` exist, and the ``prepared.json`` marker
is written last. An unfinished folder holds ``prepare.partial.json`` with the settings it was
started with, so finishing it with other settings (which would mix two frame selections or sizes)
is refused instead of done silently.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import DreamPoseError
from ..files.atomic import atomic_output
from ..files.paths import IMAGE_SUFFIXES, natural_key
from ..pipeline.poses import load_uv_file, uv_file_name
from ..settings import MAX_SIZE, PrepareOptions
from .dataset import MARKER, frame_file_name, write_marker
from .densepose import DensePoseModel, estimate_uv, load_densepose_model

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".webm", ".mkv", ".m4v")
PLAN = "prepare.partial.json"          # an unfinished folder's settings; removed once the marker is written
EMPTY_WARN_FRACTION = 0.1              # warn when more than this share of a video's frames has no person
ASPECT_TOLERANCE = 0.01                # an existing .npy may differ from its frame in size, not in shape
_OURS = re.compile(r"^frame_(\d+)(?:\.png|_densepose\.npy)$")
_TEMP = re.compile(r"^\.frame_\d+(?:\.png|_densepose\.npy)\.\d+\.tmp$")
_NOT_A_FRAME = re.compile(r"_(?:iuv|densepose)\.png$", re.IGNORECASE)   # IUV pictures, visualisations
_SETTING_KEYS = ("height", "width", "every", "fps", "max_frames")        # what decides the frames written
_CREATED_BY = "python -m dreampose prepare"                              # in the marker of a folder prepare made


# ---------------------------------------------------------------------------------------------- options

# ---------------------------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """One thing to prepare: a video file or a folder of frame images, and the folder (relative to
    the output root) it is prepared into."""

    kind: str       # "video" or "frames"
    path: str       # absolute
    rel: str        # output folder below OUT


def is_frame_image(name: str) -> bool:
    return (name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
            and not _NOT_A_FRAME.search(name))


def list_frame_images(folder: str) -> list[str]:
    """A frame folder's images in natural order (``frame_2`` before ``frame_10``)."""
    names = sorted((n for n in os.listdir(folder) if is_frame_image(n)), key=natural_key)
    return [os.path.join(folder, n) for n in names]


def existing_uv_path(image_path: str) -> str | None:
    """``<stem>_densepose.npy`` beside a frame image (the authors' name for its pose), if it exists."""
    path = os.path.splitext(image_path)[0] + "_densepose.npy"
    return path if os.path.isfile(path) else None


def find_sources(root: str, exclude: tuple[str, ...] = ()) -> list[Source]:
    """Every video file and frame folder below ``root`` (recursive), sorted by output folder.

    A video ``DIR/X.mp4`` goes to ``DIR/X``; a folder of images (and no videos) goes to its own
    relative path (the root itself to its own name). Hidden names and the folders in ``exclude``
    (the output, when it lies inside ``root``) are not searched. Two sources that would share an
    output folder (``X.mp4`` and ``X.mov``) are an error.
    """
    if os.path.isfile(root):
        if not root.lower().endswith(VIDEO_SUFFIXES):
            raise DreamPoseError(f"{root!r} is not a video ({', '.join(VIDEO_SUFFIXES)}); give a video, a folder of "
                                 "videos or a folder of frame images")
        return [Source("video", os.path.abspath(root), os.path.splitext(os.path.basename(root))[0])]
    if not os.path.isdir(root):
        raise DreamPoseError(f"source folder not found: {root!r}")
    root = os.path.abspath(root)
    skip = {os.path.realpath(p) for p in exclude}
    by_rel: dict[str, Source] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip)
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == os.curdir else rel_dir
        names = sorted(n for n in filenames if not n.startswith("."))
        videos = [n for n in names if n.lower().endswith(VIDEO_SUFFIXES)]
        found = [Source("video", os.path.join(dirpath, n), os.path.join(rel_dir, os.path.splitext(n)[0]))
                 for n in videos]
        if not videos and any(is_frame_image(n) for n in names):
            found.append(Source("frames", dirpath, rel_dir or os.path.basename(root)))
        for source in found:
            other = by_rel.get(source.rel)
            if other is not None:
                raise DreamPoseError(f"{other.path!r} and {source.path!r} would both be prepared into {source.rel!r}; "
                                     "rename one of them")
            by_rel[source.rel] = source
    if not by_rel:
        raise DreamPoseError(f"no videos ({' '.join(VIDEO_SUFFIXES)}) or folders of frame images "
                             f"({' '.join(IMAGE_SUFFIXES)}) under {root!r}")
    return [by_rel[k] for k in sorted(by_rel)]


# ---------------------------------------------------------------------------------------------- resizing

def output_size(height: int, width: int, out_height: int | None, out_width: int | None) -> tuple[int, int]:
    """Both given: exactly that; one given: the other keeps the aspect ratio; none: unchanged."""
    if out_height and out_width:
        return out_height, out_width
    if out_height:
        return out_height, max(1, round(width * out_height / height))
    if out_width:
        return max(1, round(height * out_width / width)), out_width
    return height, width


def resize_frame(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[H,W,3]`` uint8 → ``[height,width,3]``: area averaging when shrinking, bicubic when enlarging."""
    if rgb.shape[:2] == (height, width):
        return rgb
    shrink = height * width <= rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def resize_uv(uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[2,H,W]`` UV → ``[2,height,width]`` by nearest-neighbour sampling at pixel centres: every
    output value is one of the input's, so a part border never blends two parts' coordinates."""
    if tuple(uv.shape[-2:]) == (height, width):
        return uv
    return F.interpolate(uv[None].float(), size=(height, width), mode="nearest-exact")[0]


# ---------------------------------------------------------------------------------------------- frame picking

def frame_picks(step: float) -> Iterator[int]:
    """Source frame indices to keep, for one kept frame per ``step`` source frames (step ≥ 1): the
    source frame nearest to each multiple of ``step`` — 0, N, 2N … for a whole ``step``."""
    k = 0
    while True:
        yield math.floor(k * step + 0.5)
        k += 1


def pick_step(options: PrepareOptions, source_fps: float | None, what: str) -> tuple[float, float | None]:
    """(source frames per kept frame, output frame rate or None when the source's is unknown)."""
    if options.fps is None:
        return float(options.every), (source_fps / options.every if source_fps else None)
    if not source_fps:
        raise DreamPoseError(f"{what}: its frame rate is unknown, so fps cannot pick frames; use every instead")
    if options.fps >= source_fps:
        return 1.0, source_fps
    return source_fps / options.fps, float(options.fps)


def _first_picks(step: float, limit: int, max_frames: int) -> list[int]:
    picks = []
    for i in frame_picks(step):
        if i >= limit or (max_frames and len(picks) >= max_frames):
            return picks
        picks.append(i)
    return picks  # pragma: no cover (frame_picks never ends)


# ---------------------------------------------------------------------------------------------- readers

@dataclass
class _Frame:
    number: int                 # output frame number
    index: int                  # source frame index
    rgb: np.ndarray | None      # decoded RGB uint8, None when the frame is already done
    npy: str | None = None      # an existing UV file for it
    shape: tuple[int, int] = (0, 0)   # the source frame's size (before resizing)


class _VideoReader:
    """Sequential OpenCV decoding (seeking is frame-inaccurate for many codecs); frames that are
    not needed are only grabbed, not converted."""

    kind = "video"

    def __init__(self, path: str):
        self.path = path
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            cap.release()
            raise DreamPoseError(f"{path}: cannot be decoded (not a video OpenCV can open, or a damaged file)")
        ok, bgr = cap.read()
        if not ok or bgr is None:
            cap.release()
            raise DreamPoseError(f"{path}: cannot be decoded (OpenCV opened it but could not read a frame)")
        self.cap = cap
        self.first = bgr
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0)
        self.fps = fps if math.isfinite(fps) and fps > 0 else None
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.reported = int(count) if math.isfinite(count) and count > 0 else 0
        self.size = bgr.shape[:2]
        self.decoded = 0       # source frames passed through
        self.ended = False     # decoding stopped at the end of the stream (not at max_frames)

    def close(self) -> None:
        self.cap.release()

    def expected(self, step: float, max_frames: int) -> int | None:
        return len(_first_picks(step, self.reported, max_frames)) if self.reported else None

    def frames(self, step: float, max_frames: int, wanted: Callable[[int], bool]) -> Iterator[_Frame]:
        picks = frame_picks(step)
        pick, number, index = next(picks), 0, 0
        while not max_frames or number < max_frames:
            keep = index == pick and wanted(number)
            if index == 0:
                ok, bgr = True, self.first
            elif keep:
                ok, bgr = self.cap.read()
            else:
                ok, bgr = self.cap.grab(), None
            if not ok:
                self.ended = True
                break
            self.decoded = index + 1
            if index == pick:
                if keep and bgr.shape[:2] != self.size:
                    raise DreamPoseError(f"{self.path}: frame {index} is {bgr.shape[1]}x{bgr.shape[0]}, the first "
                                         f"was {self.size[1]}x{self.size[0]} (WxH)")
                rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)) if keep else None
                yield _Frame(number, index, rgb)
                number += 1
                pick = next(picks)
            index += 1


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError) as exc:
        raise DreamPoseError(f"{path}: not a readable image ({exc})") from exc


def read_image(path: str) -> np.ndarray:
    """An image file → ``[H,W,3]`` uint8 RGB (alpha dropped, greyscale expanded)."""
    try:
        with Image.open(path) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except (UnidentifiedImageError, OSError) as exc:
        raise DreamPoseError(f"{path}: not a readable image ({exc})") from exc


class _FramesReader:
    """A folder of frame images; the picks are known up front (the folder's listing)."""

    kind = "frames"

    def __init__(self, path: str, options: PrepareOptions):
        self.path = path
        self.images = list_frame_images(path)
        if not self.images:
            raise DreamPoseError(f"{path}: no frame images ({' '.join(IMAGE_SUFFIXES)})")
        self.fps = _marker_fps(path)
        step, _ = pick_step(options, self.fps, f"frame folder {path!r}")
        self.picks = _first_picks(step, len(self.images), options.max_frames)
        self.npys = [existing_uv_path(self.images[i]) for i in self.picks]
        self.size = None
        self.reported = len(self.images)
        self.decoded = len(self.images)
        self.ended = True

    def missing_uv(self) -> int:
        return sum(p is None for p in self.npys)

    def check_sizes(self, resized_to_fixed_size: bool) -> None:
        sizes = {_image_size(self.images[i]) for i in self.picks}
        if len(sizes) > 1 and not resized_to_fixed_size:
            raise DreamPoseError(f"{self.path}: frames have different sizes {sorted(sizes)} (HxW); give both height "
                                 "and width to resize them to one size")
        self.size = _image_size(self.images[self.picks[0]])

    def close(self) -> None:
        pass

    def expected(self, step: float, max_frames: int) -> int:
        return len(self.picks)

    def frames(self, step: float, max_frames: int, wanted: Callable[[int], bool]) -> Iterator[_Frame]:
        for number, (index, npy) in enumerate(zip(self.picks, self.npys)):
            yield _Frame(number, index, read_image(self.images[index]) if wanted(number) else None, npy)


def _marker_fps(folder: str) -> float | None:
    """The frame rate a prepared folder recorded (re-preparing a prepared dataset keeps it known)."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            fps = json.load(f).get("fps")
    except (OSError, ValueError, AttributeError):
        return None
    return float(fps) if isinstance(fps, (int, float)) and fps > 0 else None


# ---------------------------------------------------------------------------------------------- writing

def _atomic_write(path: str, write: Callable[[object], None]) -> None:
    """Write through a temporary name in the same folder, then rename: a crash never leaves a
    truncated file under the final name (the next run would take it for a finished frame). The
    temporary name is fixed (``.<name>.<pid>.tmp``) so an interrupted folder's leftovers are known."""
    with atomic_output(path, mode=0o666, tmp_name=f".{os.path.basename(path)}.{os.getpid()}.tmp") as tmp, \
            open(tmp, "wb") as f:
        write(f)


def write_frame_png(path: str, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DreamPoseError(f"could not encode {path} as PNG")
    _atomic_write(path, lambda f: f.write(data.tobytes()))


def write_uv_npy(path: str, uv: torch.Tensor) -> None:
    array = np.ascontiguousarray(uv.detach().cpu().numpy().astype(np.float32))
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _frame_done(folder: str, number: int) -> bool:
    return (os.path.isfile(os.path.join(folder, frame_file_name(number)))
            and os.path.isfile(os.path.join(folder, uv_file_name(number))))


def _our_files(folder: str) -> list[str]:
    """What prepare writes in a video folder (and nothing else the user may keep there)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if _OURS.match(n) or _TEMP.match(n) or n in (MARKER, PLAN))


def _remove(folder: str, names) -> None:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.remove(path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _differences(old: dict, new: dict, keys) -> str:
    return ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def check_size(options: PrepareOptions) -> None:
    """The output size asked for is at most :data:`MAX_SIZE` (the largest frame the other commands make):
    checked before any work, where a huge size would only fail (out of memory) on the first frame."""
    for name in ("height", "width"):
        value = getattr(options, name)
        if isinstance(value, int) and value > MAX_SIZE:
            raise DreamPoseError(f"{name} {value} is larger than {MAX_SIZE} pixels, the largest frame size; give "
                                 f"at most {MAX_SIZE}")


def foreign_files(folder: str, options: PrepareOptions) -> list[str]:
    """The files in an output video folder that this job would replace but did not write: frames and
    poses in a folder with no ``prepare.partial.json`` (prepare writes it before any frame, so its own
    interrupted folders have one), or, on overwrite, those of a finished folder another tool marked."""
    if not os.path.isdir(folder):
        return []
    marker = os.path.join(folder, MARKER)
    if os.path.isfile(marker):
        if not options.overwrite or (_read_json(marker) or {}).get("created_by") == _CREATED_BY:
            return []   # kept as it is, or redone as this command's own
        return _our_files(folder)
    if os.path.isfile(os.path.join(folder, PLAN)):
        return []
    return [n for n in _our_files(folder) if _OURS.match(n)]


def check_not_foreign(folder: str, options: PrepareOptions, force: bool) -> None:
    """Refuse, before any work, to replace files in ``folder`` that prepare did not write for this job."""
    theirs = [] if force else foreign_files(folder, options)
    if theirs:
        more = f" and {len(theirs) - 1} more" if len(theirs) > 1 else ""
        raise DreamPoseError(f"{folder} already holds {theirs[0]}{more} that prepare did not write for this job; "
                             "pass --force to replace them, or give another --out")


def _start_folder(folder: str, settings: dict, overwrite: bool) -> None:
    """Make the folder ready to (re)write: clear it on overwrite (or --force), else refuse to finish a
    folder started with other settings; drop temporary files of an interrupted run; record the settings."""
    os.makedirs(folder, exist_ok=True)
    if overwrite:
        _remove(folder, _our_files(folder))
    else:
        started = _read_json(os.path.join(folder, PLAN))
        if started is not None and started.get("settings") != settings:
            diff = _differences(started.get("settings") or {}, settings, sorted(settings))
            raise DreamPoseError(f"{folder} was started with other settings ({diff}); finish it with the same "
                                 "options, or use overwrite to start it again")
        _remove(folder, [n for n in os.listdir(folder) if _TEMP.match(n)])
    plan = os.path.join(folder, PLAN)
    _atomic_write(plan, lambda f: f.write(json.dumps({"settings": settings}, indent=1, sort_keys=True).encode()))


# ---------------------------------------------------------------------------------------------- one source

@dataclass(frozen=True)
class PrepareEvent:
    """A progress report. ``kind``: ``start``, ``frames`` (``done`` of about ``total`` frames),
    ``done``, ``skipped``, ``failed`` or ``warning``; ``index``/``count`` place the video in the run."""

    kind: str
    video: str
    done: int = 0
    total: int | None = None
    message: str = ""
    index: int = 0
    count: int = 0


def _settings(options: PrepareOptions, estimates: bool, estimator: DensePoseModel | None) -> dict:
    settings = {k: getattr(options, k) for k in _SETTING_KEYS}
    settings.update(person=None, detect_resolution=None, densepose=None)
    if estimates:
        settings.update(person=options.person, detect_resolution=options.detect_resolution,
                        densepose=(os.path.basename(estimator.path)
                                   if estimator is not None and estimator.path else None))
    return settings


def _open(source: Source, options: PrepareOptions):
    if source.kind == "video":
        return _VideoReader(source.path)
    if source.kind == "frames":
        return _FramesReader(source.path, options)
    raise DreamPoseError(f"unknown source kind {source.kind!r}")


def prepare_source(source: Source, out_dir: str, *, estimator: DensePoseModel | None = None,
                   options: PrepareOptions = PrepareOptions(),
                   progress: Callable[[PrepareEvent], None] | None = None, force: bool = False) -> dict:
    """Prepare one video or frame folder into ``out_dir``; resume it if unfinished. Files there that
    prepare did not write for this job are refused before any work unless ``force`` (replaces them).

    Returns ``{"status": "prepared" | "skipped", "frames", "written", "resumed", "empty_frames",
    "info" (the marker), "note"}``. Raises :class:`DreamPoseError` for a source that cannot be read;
    one that cannot be opened, or needs the estimator when none is given, fails before anything is
    written. A loaded ``estimator`` runs on the device it is on.
    """
    options.check()
    check_size(options)
    if os.path.realpath(out_dir) == os.path.realpath(source.path):
        raise DreamPoseError(f"{source.path}: the output folder is the source folder itself; choose another output")
    check_not_foreign(out_dir, options, force)
    replace_theirs = bool(force and foreign_files(out_dir, options))
    emit = progress or (lambda event: None)
    if os.path.isfile(os.path.join(out_dir, MARKER)) and not options.overwrite:
        _remove(out_dir, [PLAN])   # a run stopped between marker and clean-up
        marker = _read_json(os.path.join(out_dir, MARKER))
        old = (marker or {}).get("settings") or {}
        new = {k: getattr(options, k) for k in _SETTING_KEYS}
        diff = _differences(old, new, _SETTING_KEYS)
        note = f"prepared with other settings ({diff}); use overwrite to redo it" if diff else ""
        frames = (marker or {}).get("frames", 0)
        return {"status": "skipped", "frames": frames, "written": 0, "resumed": 0,
                "empty_frames": (marker or {}).get("empty_frames", []), "info": marker, "note": note}

    reader = _open(source, options)
    try:
        return _prepare(source, reader, out_dir, estimator, options, emit, replace_theirs)
    finally:
        reader.close()


def _prepare(source: Source, reader, out_dir: str, estimator: DensePoseModel | None, options: PrepareOptions,
             emit: Callable[[PrepareEvent], None], replace_theirs: bool = False) -> dict:
    what = source.rel
    step, out_fps = pick_step(options, reader.fps, source.path)
    fixed = bool(options.height and options.width)
    if reader.kind == "frames":
        reader.check_sizes(fixed)
        estimates = reader.missing_uv() > 0
    else:
        estimates = True
    if estimates and estimator is None:
        raise DreamPoseError(f"{source.path}: needs DensePose UV estimated (no existing frame_N_densepose.npy for "
                             f"{'its frames' if reader.kind == 'video' else 'some frames'}); give a DensePose "
                             "TorchScript export (densepose_r50_fpn_dl.torchscript)")
    src_h, src_w = reader.size
    out_h, out_w = output_size(src_h, src_w, options.height, options.width)
    if max(out_h, out_w) > MAX_SIZE:
        raise DreamPoseError(f"{source.path}: its frames would be {out_w}x{out_h} (WxH), larger than {MAX_SIZE} "
                             f"pixels; give --height and --width of at most {MAX_SIZE} to resize them")
    settings = _settings(options, estimates, estimator)
    _start_folder(out_dir, settings, options.overwrite or replace_theirs)
    total = reader.expected(step, options.max_frames)

    indices: list[int] = []
    empty: list[int] = []
    counts = {"written": 0, "resumed": 0, "existing": 0, "estimated": 0}
    batch: list[_Frame] = []
    reported = [0]   # the last frame count reported

    def flush() -> None:
        if not batch:
            return
        needs = [f for f in batch if f.npy is None]
        estimated = {}
        if needs:
            result = estimate_uv(estimator, torch.from_numpy(np.stack([f.rgb for f in needs])), person=options.person,
                                 frames_per_batch=options.frames_per_batch,
                                 detect_resolution=options.detect_resolution)
            estimated = {f.number: result.uv[i] for i, f in enumerate(needs)}
        for f in batch:
            uv = estimated[f.number] if f.npy is None else _existing_uv(f.npy, f.shape, out_h, out_w)
            write_frame_png(os.path.join(out_dir, frame_file_name(f.number)), f.rgb)
            write_uv_npy(os.path.join(out_dir, uv_file_name(f.number)), uv)
            if not bool(uv.any()):
                empty.append(f.number)
            counts["written"] += 1
        reported[0] = batch[-1].number + 1
        emit(PrepareEvent("frames", what, reported[0], total))
        batch.clear()

    for frame in reader.frames(step, options.max_frames, lambda n: not _frame_done(out_dir, n)):
        indices.append(frame.index)
        counts["existing" if frame.npy else "estimated"] += 1
        if frame.rgb is None:   # done by an earlier run: only its emptiness is needed for the marker
            counts["resumed"] += 1
            if not np.load(os.path.join(out_dir, uv_file_name(frame.number)), allow_pickle=False).any():
                empty.append(frame.number)
            continue
        frame.shape = frame.rgb.shape[:2]
        frame.rgb = resize_frame(frame.rgb, out_h, out_w)
        batch.append(frame)
        if len(batch) >= options.frames_per_batch:
            flush()
    flush()

    frames = len(indices)
    if frames == 0:
        raise DreamPoseError(f"{source.path}: no frames to prepare")
    if reported[0] != frames or total != frames:   # resumed frames at the end, or the count was a guess
        emit(PrepareEvent("frames", what, frames, frames))
    stale = [n for n in _our_files(out_dir) if (m := _OURS.match(n)) and int(m.group(1)) >= frames]
    if stale:
        emit(PrepareEvent("warning", what, message=f"removed {len(stale)} file(s) beyond its {frames} frames "
                                                     f"(e.g. {stale[0]}) left by an earlier run"))
        _remove(out_dir, stale)
    if reader.kind == "video" and reader.ended and reader.reported and reader.decoded < reader.reported - 1:
        emit(PrepareEvent("warning", what, message=f"decoded {reader.decoded} of the {reader.reported} frames the "
                                                     "video reports: it may be truncated or damaged"))
    empty.sort()
    if estimates and counts["existing"]:
        uv_source = (f"existing npy ({counts['existing']} frames) + densepose {estimator.path} "
                     f"({counts['estimated']} frames)")
    else:
        uv_source = f"densepose {estimator.path}" if estimates else "existing npy"
    info = {"source": source.path, "kind": source.kind, "frames": frames, "fps": out_fps, "height": out_h,
            "width": out_w, "source_fps": reader.fps, "source_height": src_h, "source_width": src_w,
            "source_frames": indices, "uv_source": uv_source, "empty_frames": empty, "settings": settings,
            "created_by": _CREATED_BY}
    write_marker(out_dir, **info)
    _remove(out_dir, [PLAN])
    if len(empty) > EMPTY_WARN_FRACTION * frames:
        emit(PrepareEvent("warning", what, message=f"{len(empty)} of {frames} frames have no person detected (their "
                                                     "UV is all zeros); check the video or the DensePose model"))
    return {"status": "prepared", "frames": frames, "written": counts["written"], "resumed": counts["resumed"],
            "empty_frames": empty, "info": info, "note": ""}


def _existing_uv(path: str, frame_shape: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """An authors'-format UV file for a frame of ``frame_shape``, at the output size (nearest)."""
    uv = load_uv_file(path)
    uv_h, uv_w = uv.shape[-2:]
    frame_h, frame_w = frame_shape
    if ((uv_h, uv_w) != (frame_h, frame_w)
            and abs(uv_w / uv_h - frame_w / frame_h) > ASPECT_TOLERANCE * frame_w / frame_h):
        raise DreamPoseError(f"{path}: UV of {uv_w}x{uv_h} does not fit its {frame_w}x{frame_h} (WxH) frame's shape; "
                             "it belongs to another frame size")
    return resize_uv(uv, height, width)


# ---------------------------------------------------------------------------------------------- a dataset

@dataclass
class PrepareSummary:
    """What a run did: output folders (relative to ``out``) prepared, skipped, and failed with why."""

    out: str
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    frames_written: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def prepare_dataset(root: str, out: str, *, densepose: str | DensePoseModel | None = None,
                    device: torch.device | str = "cpu", options: PrepareOptions = PrepareOptions(),
                    progress: Callable[[PrepareEvent], None] | None = None, force: bool = False) -> PrepareSummary:
    """Prepare every source below ``root`` into ``out`` (see the module notes). A source that fails
    is reported (a ``failed`` event and in the summary) and the rest continue.

    Checked before any frame is decoded: the options (sizes at most MAX_SIZE), the output path, that
    there are sources, that no output folder holds files prepare did not write for this job (unless
    ``force``, which replaces them), and that a DensePose model is given if some unfinished source
    has frames without an existing ``.npy`` (the error names it). ``densepose``: a TorchScript file
    or a loaded model.
    """
    options.check()
    check_size(options)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DreamPoseError(f"output {out!r} is a file; give a folder")
    if os.path.isdir(root) and os.path.realpath(out) == os.path.realpath(root):
        raise DreamPoseError(f"the output folder is the source folder {root!r}; give another output folder")
    sources = find_sources(root, exclude=(out,))
    for source in sources:
        check_not_foreign(os.path.join(out, source.rel), options, force)
    emit = progress or (lambda event: None)

    # which unfinished sources need the estimator; per-source problems found now fail that source
    early_failures: dict[str, str] = {}
    needs_model: list[Source] = []
    for source in sources:
        if not options.overwrite and os.path.isfile(os.path.join(out, source.rel, MARKER)):
            continue
        if source.kind == "video":
            needs_model.append(source)
            continue
        try:
            if _FramesReader(source.path, options).missing_uv():
                needs_model.append(source)
        except DreamPoseError as exc:
            early_failures[source.rel] = str(exc)
    if isinstance(densepose, str) and not os.path.isfile(densepose):
        raise DreamPoseError(f"DensePose model not found: {densepose!r}")
    model = None
    if needs_model:
        if densepose is None:
            first = needs_model[0]
            more = f" (and {len(needs_model) - 1} more)" if len(needs_model) > 1 else ""
            what = "a video" if first.kind == "video" else "a frame folder with frames that have no _densepose.npy"
            raise DreamPoseError(f"{first.path} ({what}){more} needs DensePose UV estimated: give a DensePose "
                                 "TorchScript export, e.g. --densepose densepose_r50_fpn_dl.torchscript")
        model = load_densepose_model(densepose, device) if isinstance(densepose, str) else densepose

    summary = PrepareSummary(out)
    count = len(sources)
    for index, source in enumerate(sources, 1):
        def report(event: PrepareEvent, index=index) -> None:
            emit(replace(event, index=index, count=count))

        target = os.path.join(out, source.rel)
        report(PrepareEvent("start", source.rel, message=f"{source.path} → {target}"))
        try:
            if source.rel in early_failures:
                raise DreamPoseError(early_failures[source.rel])
            result = prepare_source(source, target, estimator=model, options=options, progress=report,
                                    force=force)
        except Exception as exc:  # noqa: BLE001  (one bad video must not stop a long run; Ctrl-C still does)
            reason = str(exc) if isinstance(exc, DreamPoseError) else f"{type(exc).__name__}: {exc}"
            summary.failed.append((source.rel, reason))
            report(PrepareEvent("failed", source.rel, message=reason))
            continue
        summary.frames_written += result["written"]
        if result["status"] == "skipped":
            summary.skipped.append(source.rel)
            report(PrepareEvent("skipped", source.rel, result["frames"], result["frames"],
                                message=result["note"] or "already prepared"))
        else:
            summary.prepared.append(source.rel)
            resumed = f", {result['resumed']} from an earlier run" if result["resumed"] else ""
            empty = f", {len(result['empty_frames'])} without a person" if result["empty_frames"] else ""
            report(PrepareEvent("done", source.rel, result["frames"], result["frames"],
                                message=f"{result['frames']} frames ({result['written']} written{resumed}{empty})"))
    return summary
