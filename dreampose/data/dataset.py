"""Prepared video folders: the on-disk dataset that ``prepare`` and the synthetic world write and
``train`` and ``eval`` read.

One video is one folder holding ``frame_N.png`` (RGB) and, beside each, ``frame_N_densepose.npy``
((2,H,W) U,V, 0 on the background): the layout the authors' DensePose script wrote, so a prepared
folder is also a valid ``animate --poses`` folder. A ``prepared.json`` marker is written last; a
folder without it is unfinished (``prepare`` resumes it, readers skip it with a warning).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DreamPoseError
from ..files.atomic import write_json_atomic
from ..pipeline.poses import load_uv_file, uv_file_name

MARKER = "prepared.json"
_FRAME_PNG = re.compile(r"^frame_(\d+)\.png$")


def frame_file_name(number: int) -> str:
    return f"frame_{number}.png"


@dataclass(frozen=True)
class VideoFolder:
    """A finished prepared video: frame images and their UV files, in frame order."""

    path: str
    frames: tuple[str, ...]
    poses: tuple[str, ...]

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip(os.sep))

    def __len__(self) -> int:
        return len(self.frames)

    def info(self) -> dict:
        with open(os.path.join(self.path, MARKER)) as f:
            return json.load(f)


def read_video_folder(path: str) -> VideoFolder:
    """Check one prepared folder: a marker, at least one frame, a UV file for every frame."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise DreamPoseError(f"{path!r} is not a finished prepared video (no {MARKER}); run "
                             "`python -m dreampose prepare` on its source again to finish it")
    numbers = sorted(int(m.group(1)) for n in os.listdir(path) if (m := _FRAME_PNG.match(n)))
    if not numbers:
        raise DreamPoseError(f"{path!r} holds no frame_N.png images")
    missing = [n for n in numbers if not os.path.isfile(os.path.join(path, uv_file_name(n)))]
    if missing:
        raise DreamPoseError(f"{path!r}: {len(missing)} frame(s) have no DensePose file, e.g. "
                             f"{uv_file_name(missing[0])}; prepare the video again")
    return VideoFolder(path, tuple(os.path.join(path, frame_file_name(n)) for n in numbers),
                       tuple(os.path.join(path, uv_file_name(n)) for n in numbers))


def find_videos(roots: list[str] | str, warn=None) -> list[VideoFolder]:
    """Every finished prepared video below ``roots`` (searched recursively), sorted by path.

    Unfinished folders (frames but no marker) are skipped and reported through ``warn``.
    """
    roots = [roots] if isinstance(roots, str) else list(roots)
    videos = []
    for root in roots:
        if not os.path.isdir(root):
            raise DreamPoseError(f"dataset folder not found: {root!r}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if MARKER in filenames:
                videos.append(read_video_folder(dirpath))
            elif warn is not None and any(_FRAME_PNG.match(n) for n in filenames):
                warn(f"skipping {dirpath!r}: unfinished (no {MARKER})")
    if not videos:
        raise DreamPoseError(f"no prepared videos under {roots}: make them with `python -m dreampose prepare` "
                             "(or `python -m dreampose synth` for the synthetic world)")
    return sorted(videos, key=lambda v: v.path)


def load_frame(path: str) -> torch.Tensor:
    """``[3,H,W]`` uint8 RGB; an unreadable file is a DreamPoseError that names it."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise DreamPoseError(f"{path}: not a readable image ({exc})") from exc


def video_problem(video: VideoFolder) -> str | None:
    """The first unreadable frame or pose file of a video (its name and what is wrong), or None.

    Frames are checked with PIL's ``verify`` (every chunk's checksum, so a truncated or damaged PNG is
    found without decoding it), poses by loading them with their value checks: a whole dataset is
    screened in seconds, before training, instead of failing at some step hours in.
    """
    for frame, pose in zip(video.frames, video.poses):
        try:
            with Image.open(frame) as im:
                im.verify()
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
            return f"{os.path.basename(frame)} is not a readable image ({exc})"
        try:
            load_uv_file(pose)
        except (DreamPoseError, OSError) as exc:
            return f"{os.path.basename(pose)}: {str(exc).removeprefix(pose + ': ')}"
    return None


def screen_videos(videos: list[VideoFolder], *, strict: bool, warn) -> list[VideoFolder]:
    """The videos whose every frame and pose reads (:func:`video_problem`).

    Bad videos are skipped, each reported through ``warn`` with the file and the cause and counted at
    the end; with ``strict`` the first one stops the run instead.

    Raises:
        DreamPoseError: ``strict`` and a bad video, or no good video left.
    """
    good, bad = [], []
    for video in videos:
        problem = video_problem(video)
        if problem is None:
            good.append(video)
            continue
        if strict:
            raise DreamPoseError(f"bad data in {video.path}: {problem}; fix or remove that video, or train without "
                                 "--strict to skip such videos")
        bad.append(video)
        warn(f"skipping video {video.path}: {problem}")
    if bad:
        warn(f"skipped {len(bad)} of {len(videos)} video(s) with unreadable frames or poses")
    if not good:
        raise DreamPoseError(f"none of the {len(videos)} video(s) can be read; see the messages above")
    return good


def load_pose(path: str) -> torch.Tensor:
    """``[2,H,W]`` float32 raw UV."""
    return load_uv_file(path)


def write_marker(folder: str, **info) -> str:
    """Write the finished-marker atomically (temp name, then rename)."""
    return write_json_atomic(os.path.join(folder, MARKER), info, indent=1, sort_keys=True)
