"""``python -m dreampose prepare``: videos (or frame folders) → prepared video folders for train/eval.

Progress goes to stderr (one line per video event, and a live bar of the frames written), the
summary to stdout. The exit status is 1 when some video failed (the others are still prepared), 2
for a bad command line or input found before any work.
"""
from __future__ import annotations

import sys
import time

from ..settings import PrepareOptions
from .common import add_options, err, options_from_args, positive_int, progress_bar


def register(sub) -> None:
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
    groups: dict = {}
    add_options(p, PrepareOptions, ("height", "width"), groups=groups)
    add_options(p, PrepareOptions, ("every", "fps"), group=groups["frames"].add_mutually_exclusive_group())
    add_options(p, PrepareOptions, ("max_frames", "person", "detect_resolution", "frames_per_batch"), groups=groups)
    groups["DensePose"].add_argument("--device", default="auto",
                                     help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    add_options(p, PrepareOptions, ("overwrite",))
    p.add_argument("--force", action="store_true",
                   help="replace frame and pose files in --out that prepare did not write for this job (another "
                        "source's, or put there by hand); without it such a folder is refused before any work")
    p.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--quiet", action="store_true", help="only warnings, failures and the summary")
    p.set_defaults(func=run)


class _Printer:
    """Prints :class:`dreampose.data.prepare.PrepareEvent` lines, one per video event (start, done,
    skipped, warning, failed), and shows the frames written as a live bar per video."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.bar = None

    def _line(self, text: str) -> None:
        self._close_bar()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, event) -> None:
        where = f"[{event.index}/{event.count}] {event.video}"
        if event.kind == "warning":
            self._line(f"{where}: warning: {event.message}")
        elif event.kind == "failed":
            self._line(f"{where}: FAILED: {event.message}")
        elif self.quiet:
            return
        elif event.kind == "start":
            self.t0 = time.perf_counter()
            self._line(f"{where}: {event.message}")
        elif event.kind == "frames":
            if self.bar is None:
                self.bar = progress_bar(f"{where}", event.total, unit="frame")
            if event.total is not None and self.bar.total != event.total:
                self.bar.total = event.total
            self.bar.update(event.done - self.bar.n)
        elif event.kind in ("done", "skipped"):
            tail = f" in {time.perf_counter() - self.t0:.1f} s" if event.kind == "done" else ""
            self._line(f"{where}: {event.kind}: {event.message}{tail}")


def run(args) -> int:
    from ..models.devices import resolve_device
    from ..data.prepare import check_size, prepare_dataset

    options = options_from_args(args, PrepareOptions()).check()
    check_size(options)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    summary = prepare_dataset(args.source, args.out, densepose=args.densepose, device=device, options=options,
                              progress=_Printer(args.quiet), force=args.force)
    print(f"prepare: {len(summary.prepared)} prepared, {len(summary.skipped)} skipped (already prepared), "
          f"{len(summary.failed)} failed; {summary.frames_written} frame(s) written to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    for rel, reason in summary.failed:
        err(f"failed: {rel}: {reason}")
    if summary.failed:
        err("dreampose prepare: some videos failed (listed above); fix or remove them and run the same command "
             "again: finished videos are skipped")
    return 1 if summary.failed else 0
