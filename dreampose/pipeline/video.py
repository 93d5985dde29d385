"""Writing generated frames to disk: numbered PNGs and an MP4 (OpenCV, ``mp4v``).

Frames come in as ComfyUI's IMAGE layout ``[F,H,W,3]``, float 0..1 (or uint8), RGB. OpenCV wants
BGR, so channels are swapped exactly once, here. Every file goes through :mod:`dreampose.files.atomic`
(temporary name, flushed, renamed): pictures are encoded in memory and written by Python, which
raises on a short write where ``cv2.imwrite`` would report success; the MP4, which OpenCV writes
itself, is read back and must hold every frame.
"""
from __future__ import annotations

import io
import math
import os

import cv2
import numpy as np
import torch
from PIL import Image

from ..errors import DreamPoseError
from ..files.atomic import atomic_output, write_bytes_atomic
from ..files.destinations import incomplete_write

FRAME_PATTERN = "frame_{:04d}.png"


def to_uint8(frames) -> np.ndarray:
    """``[F,H,W,3]`` float 0..1 or uint8 (torch or numpy) → contiguous uint8 numpy, RGB."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else frames.float().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DreamPoseError(f"frames must be [F,H,W,3] RGB, got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise DreamPoseError("no frames to write")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.isfinite(frames).all():
        raise DreamPoseError("frames contain NaN or infinite values (a precision problem? try --dtype fp32)")
    return np.ascontiguousarray((np.clip(frames, 0, 1) * 255).round().astype(np.uint8))


def save_png_frames(frames, folder: str, pattern: str = FRAME_PATTERN, start: int = 0) -> list[str]:
    """One PNG per frame, ``frame_0000.png`` …; returns the paths.

    Args:
        frames: ``[F,H,W,3]`` (or one ``[H,W,3]``) RGB, float 0..1 (clipped) or uint8, torch or numpy.
        folder: where to write; created if needed. Each file is written atomically.
        pattern: the file name, formatted with the frame number.
        start: the number of the first frame.

    Returns:
        The paths written, in frame order.
    """
    video = to_uint8(frames)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, frame in enumerate(video):
        paths.append(write_bytes_atomic(os.path.join(folder, pattern.format(start + i)), _encode(frame, ".png")))
    return paths


def write_mp4(frames, path: str, fps: float = 30.0) -> str:
    """Encode frames as MPEG-4 part 2 (``mp4v``, playable without extra codecs); atomic rename.

    Args:
        frames: ``[F,H,W,3]`` (or one ``[H,W,3]``) RGB, float 0..1 (clipped) or uint8, torch or numpy.
        path: the video to write; its folder is created if needed.
        fps: frames per second, a positive number.

    Returns:
        ``path``.
    """
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise DreamPoseError(f"fps must be a positive number, got {fps!r}")
    video = to_uint8(frames)
    _, height, width, _ = video.shape
    with atomic_output(path, ".mp4", mode=0o666) as tmp:     # the suffix picks the container
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
        try:
            if not writer.isOpened():
                raise DreamPoseError(f"OpenCV could not open an mp4v video writer for {path} "
                                     "(this OpenCV build may lack the MPEG-4 encoder)")
            for frame in video:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        readable = _count_frames(tmp)
        if readable != len(video):
            raise incomplete_write(path, f"the video holds {readable} of {len(video)} frames")
    return path


def _count_frames(path: str) -> int:
    """Frames a video file's index says it holds (0 when OpenCV cannot open it: a truncated MP4 has none)."""
    if os.path.getsize(path) == 0:
        return 0
    capture = cv2.VideoCapture(path)
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()


def _encode(rgb: np.ndarray, suffix: str) -> bytes:
    ok, data = cv2.imencode(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DreamPoseError(f"OpenCV could not encode a {suffix} picture of shape {rgb.shape}")
    return data.tobytes()


def save_video(frames, folder: str, fps: float = 30.0, video_name: str = "dreampose.mp4",
               start: int = 0) -> tuple[list[str], str]:
    """PNG frames and the MP4 in ``folder``; returns (png paths, mp4 path).

    Args:
        frames: ``[F,H,W,3]`` (or one ``[H,W,3]``) RGB, float 0..1 (clipped) or uint8, torch or numpy.
        folder: where both go; the PNGs are ``frame_0000.png`` … from 0.
        fps: the video's frame rate.
        video_name: the MP4's file name in ``folder``.
        start: the number of the first PNG (a frame range keeps its frames' numbers).

    Returns:
        ``(png_paths, mp4_path)``.
    """
    video = to_uint8(frames)
    pngs = save_png_frames(video, folder, start=start)
    mp4 = write_mp4(video, os.path.join(folder, video_name), fps)
    return pngs, mp4


def write_gif(frames, path: str, fps: float = 8.0) -> str:
    """An animated GIF (loops forever; shows inline on GitHub and in most viewers); atomic rename.

    Args:
        frames: ``[F,H,W,3]`` (or one ``[H,W,3]``) RGB, float 0..1 (clipped) or uint8, torch or numpy.
        path: the GIF to write.
        fps: frames per second; each frame shows for ``round(1000 / fps)`` ms, at least 1.

    Returns:
        ``path``.
    """
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise DreamPoseError(f"fps must be a positive number, got {fps!r}")
    video = to_uint8(frames)
    images = [Image.fromarray(f) for f in video]
    data = io.BytesIO()
    images[0].save(data, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0)
    return write_bytes_atomic(path, data.getvalue())


def contact_sheet(rows, gap: int = 2, background: int = 255) -> np.ndarray:
    """Rows of frames (each ``[F,H,W,3]``, same H and W) → one uint8 picture, a row per sequence.

    Rows may have different lengths; short rows are left blank at the end.
    """
    rows = [to_uint8(r) for r in rows]
    if not rows:
        raise DreamPoseError("a contact sheet needs at least one row of frames")
    sizes = {r.shape[1:3] for r in rows}
    if len(sizes) != 1:
        raise DreamPoseError(f"contact sheet rows have different frame sizes {sorted(sizes)}")
    (h, w), cols = sizes.pop(), max(r.shape[0] for r in rows)
    sheet = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, frame in enumerate(row):
            sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = frame
    return sheet


def save_image(image, path: str) -> str:
    """One RGB ``[H,W,3]`` picture (float 0..1 or uint8), in the format its name says; atomic rename."""
    suffix = os.path.splitext(path)[1].lower()    # the suffix picks the format
    if not suffix:
        raise DreamPoseError(f"{path}: give the picture a file ending (.png, .jpg …) that names its format")
    return write_bytes_atomic(path, _encode(to_uint8(image)[0], suffix))
