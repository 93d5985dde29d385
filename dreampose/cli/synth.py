"""``python -m dreampose synth``: write the synthetic fashion-video world as a prepared dataset.

Each video is a folder of ``frame_N.png`` + ``frame_N_densepose.npy`` with exact UV, the layout
``train`` and ``eval`` read; ``--preview`` draws a contact sheet so a person can check the data.
"""
from __future__ import annotations

import os

from ..errors import DreamPoseError
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
                   help="replace videos another synth run (other seed, size, frames or rate) left in --out")
    p.set_defaults(func=run)


def _check(args, settings: SynthSettings) -> None:
    if settings.frames < 1:
        raise DreamPoseError(f"--frames must be at least 1, got {settings.frames}")
    for flag in ("height", "width"):
        if not 32 <= getattr(settings, flag) <= MAX_SIZE:
            raise DreamPoseError(f"--{flag} must be from 32 to {MAX_SIZE} pixels, got {getattr(settings, flag)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DreamPoseError(f"--out {args.out} is a file; give a folder for the dataset")
    if args.preview:
        if not args.preview.lower().endswith(".png"):
            raise DreamPoseError(f"--preview must name a .png file, got {args.preview}")
        if os.path.isdir(args.preview):
            raise DreamPoseError(f"--preview {args.preview} is a folder; give a .png file name")


def write_preview(path: str, folders: list[str], columns: int = PREVIEW_COLUMNS) -> str:
    """A contact sheet PNG: one row per video (at most PREVIEW_ROWS), ``columns`` evenly spaced
    frames, each with its UV (R = body, G = U, B = V) drawn under it; read back from the files."""
    import numpy as np

    from ..data.dataset import load_frame, load_pose, read_video_folder
    from ..data.densepose import visualize
    from ..pipeline.video import save_image

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
    return save_image(np.concatenate(rows, axis=0), path)


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
        write_preview(args.preview, folders)
    print(f"synth: {len(folders)} video(s) of {settings.frames} frame(s) at {settings.width}x{settings.height} in "
          f"{os.path.join(args.out, settings.split)} ({done['made']} written, {done['kept']} already finished)"
          + (f"; preview {args.preview}" if args.preview else ""), flush=True)
    return 0
