"""Paths the user gave: they exist (with the message every layer uses: the command line names the
flag, the library what the file is for), JSON configs read as objects, image files in natural order.
Torch-free, so the command line can use it before anything heavy is imported."""
from __future__ import annotations

import json
import os
import re

from ..errors import DreamPoseError


def require_path(path: str | None, what: str, *, hint: str = "", file: bool = False) -> str:
    """``path`` if it exists (as a file when ``file``), else ``"<what> not found: '<path>'. <hint>"``."""
    if path and file and os.path.isdir(path):
        raise DreamPoseError(f"{what}: {path!r} is a folder; give the file itself" + (f". {hint}" if hint else ""))
    if not path or not (os.path.isfile(path) if file else os.path.exists(path)):
        raise DreamPoseError(f"{what} not found: {path!r}" + (f". {hint}" if hint else ""))
    return path


def missing_flags(**paths: str | None) -> list[str]:
    """``--flag: not found: <path>`` for every given path that does not exist (``flag_name`` → ``--flag-name``)."""
    return [f"--{flag.replace('_', '-')}: not found: {path}" for flag, path in paths.items()
            if path and not os.path.exists(path)]


def require_flags(**paths: str | None) -> None:
    """Each given path must exist; the first missing one is a DreamPoseError naming its flag."""
    missing = missing_flags(**paths)
    if missing:
        raise DreamPoseError(missing[0])


def read_json_config(path: str, flag: str | None = None) -> dict:
    """A JSON object from a config file; a damaged one is the user's file to fix, so a DreamPoseError
    (naming the command-line ``flag`` it came from, when given)."""
    where = f"{flag} {path}" if flag else path
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise DreamPoseError(f"{where}: not a readable JSON {'file' if flag else 'config'} ({exc})") from exc
    if not isinstance(cfg, dict):
        raise DreamPoseError(f"{where}: a config must be a JSON object")
    return cfg


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def natural_key(name: str):
    """Sort key that puts ``frame_2`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]
