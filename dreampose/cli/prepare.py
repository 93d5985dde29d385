"""``python -m dreampose prepare``: videos (or frame folders) → prepared video folders for train/eval.

Progress goes to stderr (one line per video, frame counts as they are written), the summary to
stdout. The exit status is 1 when some video failed (the others are still prepared), 2 for a bad
command line or input found before any work.
"""
from __future__ import annotations

import sys
import time

from .main import _err, _nonnegative_int, _positive_float, _positive_int

PERSON_CHOICES = ("largest", "highest_score")   # dreampose.densepose.PERSON_CHOICES (not imported: no torch for --help)
DETECT_SHORT_SIDE = 800                         # dreampose.densepose.DETECT_SHORT_SIDE


def add_parser(sub) -> None:
    """Register the subcommand on the argparse sub-parsers object."""
    p = sub.add_parser(
        "prepare", help="videos → prepared video folders (frames + DensePose UV) for train and eval",
        description="Every video below SOURCE (.mp4 .mov .avi .webm .mkv .m4v) and every folder of frame images "
                    "becomes OUT/<relative path>/<video name>/ holding frame_N.png, frame_N_densepose.npy and a "
                    "prepared.json marker (UBC Fashion: SOURCE/train/X.mp4 → OUT/train/X/). Frames that already "
                    "have a frame_N_densepose.npy beside them keep it; the others get DensePose from --densepose. "
                    "Resumable: finished videos are skipped, unfinished ones continue where they stopped.")
    p.add_argument("source", help="a folder of videos (UBC Fashion: the folder holding train/ and test/), a folder of "
                                  "frame folders, or one video file")
    p.add_argument("--out", required=True, help="output folder (created; mirrors the source's sub-folders)")
    p.add_argument("--densepose", metavar="FILE.torchscript",
                   help="DensePose TorchScript export (densepose_r50_fpn_dl.torchscript); needed unless every frame "
                        "already has a _densepose.npy")
    g = p.add_argument_group("frames")
    g.add_argument("--height", type=_positive_int, help="resize frames (and poses) to this height; with only one of "
                                                        "--height/--width the other keeps the aspect ratio")
    g.add_argument("--width", type=_positive_int, help="resize frames (and poses) to this width")
    pick = g.add_mutually_exclusive_group()
    pick.add_argument("--every", type=_positive_int, default=1, metavar="N", help="keep every N-th frame (default 1)")
    pick.add_argument("--fps", type=_positive_float, help="keep the frames nearest to this frame rate (never more than "
                                                          "the video has)")
    g.add_argument("--max-frames", type=_nonnegative_int, default=0, help="at most this many frames per video (0 = all)")
    d = p.add_argument_group("DensePose")
    d.add_argument("--person", choices=PERSON_CHOICES, default="largest",
                   help="which detection becomes the pose: the largest box (default) or the best score (the authors')")
    d.add_argument("--detect-resolution", type=_nonnegative_int, default=DETECT_SHORT_SIDE,
                   help=f"shortest side the detector sees (default {DETECT_SHORT_SIDE}, as detectron2; 0 = frame size)")
    d.add_argument("--frames-per-batch", type=_positive_int, default=8,
                   help="frames decoded and estimated per batch (default 8)")
    d.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="prepare finished videos again, replacing their files")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--quiet", action="store_true", help="only warnings, failures and the summary")
    p.set_defaults(func=cmd_prepare)


class _Printer:
    """Prints :class:`dreampose.prepare.PrepareEvent` lines: one per video, frame counts on one
    updating line on a terminal (at most one line every few seconds otherwise)."""

    def __init__(self, quiet: bool = False, stream=None, interval_s: float = 5.0):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s
        self.t0 = self.last = time.perf_counter()
        self.open_line = False

    def _line(self, text: str) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event) -> None:
        where = f"[{event.index}/{event.count}] {event.video}"
        if event.kind == "warning":
            self._line(f"{where}: warning: {event.message}")
        elif event.kind == "failed":
            self._line(f"{where}: FAILED: {event.message}")
        elif self.quiet:
            return
        elif event.kind == "start":
            self.t0 = self.last = time.perf_counter()
            self._line(f"{where}: {event.message}")
        elif event.kind == "frames":
            now = time.perf_counter()
            finished = event.total is not None and event.done >= event.total
            total = "?" if event.total is None else event.total
            text = f"{where}: frame {event.done}/{total}  {now - self.t0:.1f} s"
            if self.tty:
                self.stream.write("\r" + text)
                self.open_line = True
                self.stream.flush()
            elif finished or now - self.last >= self.interval_s:
                self._line(text)
            self.last = now
        elif event.kind in ("done", "skipped"):
            tail = f" in {time.perf_counter() - self.t0:.1f} s" if event.kind == "done" else ""
            self._line(f"{where}: {event.kind}: {event.message}{tail}")


def cmd_prepare(args) -> int:
    from ..models.devices import resolve_device
    from ..data.prepare import PrepareOptions, prepare_dataset

    options = PrepareOptions(height=args.height, width=args.width, every=args.every, fps=args.fps,
                             max_frames=args.max_frames, person=args.person, frames_per_batch=args.frames_per_batch,
                             detect_resolution=args.detect_resolution, overwrite=args.overwrite).check()
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    summary = prepare_dataset(args.source, args.out, densepose=args.densepose, device=device, options=options,
                              progress=_Printer(args.quiet))
    print(f"prepare: {len(summary.prepared)} prepared, {len(summary.skipped)} skipped (already prepared), "
          f"{len(summary.failed)} failed; {summary.frames_written} frame(s) written to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    for rel, reason in summary.failed:
        _err(f"failed: {rel}: {reason}")
    if summary.failed:
        _err("dreampose prepare: some videos failed (listed above); fix or remove them and run the same command "
             "again: finished videos are skipped")
    return 1 if summary.failed else 0

