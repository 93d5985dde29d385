"""``python -m dreampose synth``: write the synthetic fashion-video world as a prepared dataset.

Each video is a folder of ``frame_N.png`` + ``frame_N_densepose.npy`` with exact UV, the layout
``train`` and ``eval`` read; ``--preview`` draws a contact sheet so a person can check the data.
"""
from __future__ import annotations

import io
import json
import os

from ..errors import DreamPoseError
from ..files.destinations import check_output_file, check_writable
from ..settings import MAX_SIZE, SynthSettings
from .common import add_options, options_from_args, progress_bar

PREVIEW_ROWS = 4      # videos shown in a contact sheet
PREVIEW_COLUMNS = 6   # frames shown per video


def register(sub) -> None:
    p = sub.add_parser(
        "synth", help="write synthetic fashion videos with exact DensePose-style UV (training/eval data)",
        description="A parametric 2D person in a textured outfit, moving on a plain background: frames and "
                    "their exact UV, written as prepared video folders OUT/SPLIT/world_NNNN/ (the layout "
                    "`train` and `eval` read). Subjects and motions come from --seed; the train and test "
                    "splits never share a subject seed or a motion seed. Finished folders are kept, so an "
                    "interrupted run resumes.")
    p.add_argument("--out", required=True, help="dataset root; videos go to OUT/SPLIT/world_NNNN/")
    add_options(p, SynthSettings)
    p.add_argument("--preview", metavar="PNG", help="also write a contact sheet: up to 4 videos, a few frames "
                                                    "each, UV visualised under every frame")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="replace videos another synth run (other seed, size, frames or rate) left in --out, frame "
                        "files no synth run wrote there, and an existing --preview file")
    p.set_defaults(func=run)


PREVIEW_KEY = "dreampose-synth"   # PNG text entry naming the dataset and job a contact sheet shows


def _preview_tag(args, settings: SynthSettings) -> str:
    """What a contact sheet of this very job says about itself, so a rerun may replace its own sheet."""
    from ..data.world import world_job

    job = world_job(seed=settings.seed, frames=settings.frames, height=settings.height, width=settings.width,
                    fps=settings.fps, split=settings.split)
    return json.dumps({"dataset": os.path.realpath(os.path.join(args.out, settings.split)), **job}, sort_keys=True)


def _is_preview_of(path: str, tag: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get(PREVIEW_KEY) == tag
    except (OSError, ValueError, SyntaxError):
        return False


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check(args, settings: SynthSettings) -> None:
    if settings.frames < 1:
        raise DreamPoseError(f"--frames must be at least 1, got {settings.frames}")
    for flag in ("height", "width"):
        if not 32 <= getattr(settings, flag) <= MAX_SIZE:
            raise DreamPoseError(f"--{flag} must be from 32 to {MAX_SIZE} pixels, got {getattr(settings, flag)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DreamPoseError(f"--out {args.out} is a file; give a folder for the dataset")
    check_writable(os.path.join(args.out, settings.split, "x"), "--out")   # a file above it, read-only, no access
    if args.preview:
        from ..data.world import in_world_folder

        if not args.preview.lower().endswith(".png"):
            raise DreamPoseError(f"--preview must name a .png file, got {args.preview}")
        if os.path.isdir(args.preview):
            raise DreamPoseError(f"--preview {args.preview} is a folder; give a .png file name")
        if _inside(args.out, args.preview):
            raise DreamPoseError(f"--preview {args.preview} is --out {args.out} or a folder above it; give the "
                                 "contact sheet another name")
        if in_world_folder(args.preview, args.out, settings.split, settings.videos):
            raise DreamPoseError(f"--preview {args.preview} is inside a video folder this run writes (its frame "
                                 "files would be replaced); put the contact sheet outside OUT/SPLIT/world_NNNN")
        tag = _preview_tag(args, settings)
        check_output_file(args.preview, "--preview", force=args.force, suffix=".png",
                          ours=lambda path: _is_preview_of(path, tag))


def write_preview(path: str, folders: list[str], columns: int = PREVIEW_COLUMNS, tag: str | None = None) -> str:
    """A contact sheet PNG: one row per video (at most PREVIEW_ROWS), ``columns`` evenly spaced
    frames, each with its UV (R = body, G = U, B = V) drawn under it; read back from the files.
    ``tag``: kept in the PNG's text, so a rerun of the same job knows the sheet as its own."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    from ..data.dataset import load_frame, load_pose, read_video_folder
    from ..data.densepose import visualize
    from ..files.atomic import write_bytes_atomic

    rows = []
    for folder in folders[:PREVIEW_ROWS]:
        video = read_video_folder(folder)
        picks = sorted({round(i * (len(video) - 1) / max(columns - 1, 1)) for i in range(columns)})
        cells = []
        for i in picks:
            frame = load_frame(video.frames[i]).permute(1, 2, 0).numpy()
            uv = (visualize(load_pose(video.poses[i]))[0].numpy() * 255).round().astype(np.uint8)
            cells.append(np.concatenate([frame, uv], axis=0))
        pad = np.full_like(cells[0], 255)
        cells += [pad] * (columns - len(cells))    # short videos leave blank cells
        rows.append(np.concatenate(cells, axis=1))
    info = PngImagePlugin.PngInfo()
    if tag is not None:
        info.add_text(PREVIEW_KEY, tag)
    data = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.concatenate(rows, axis=0))).save(data, format="PNG", pnginfo=info)
    return write_bytes_atomic(path, data.getvalue())


def run(args) -> int:
    settings = options_from_args(args, SynthSettings())
    _check(args, settings)
    from ..data.world import write_world_dataset  # numpy/torch: only when the command runs

    done = {"made": 0, "kept": 0}
    bar = progress_bar("synth", settings.videos, args.quiet, unit="video")

    def progress(k, total, folder, skipped):
        done["kept" if skipped else "made"] += 1
        bar.set_postfix_str(os.path.basename(folder) + (" (kept)" if skipped else ""), refresh=False)
        bar.update(1)

    try:
        folders = write_world_dataset(args.out, videos=settings.videos, frames=settings.frames,
                                      height=settings.height, width=settings.width, seed=settings.seed,
                                      split=settings.split, mp4=settings.mp4, progress=progress, fps=settings.fps,
                                      force=args.force)
    finally:
        bar.close()
    if args.preview:
        write_preview(args.preview, folders, tag=_preview_tag(args, settings))
    print(f"synth: {len(folders)} video(s) of {settings.frames} frame(s) at {settings.width}x{settings.height} in "
          f"{os.path.join(args.out, settings.split)} ({done['made']} written, {done['kept']} already finished)"
          + (f"; preview {args.preview}" if args.preview else ""), flush=True)
    return 0
