"""Temporal consistency against cost on the synthetic test split with the shipped demo model (issue 12).

    .venv/bin/python scripts/consistency_vs_cost.py --out out/consistency --record docs/consistency_vs_cost.json
    .venv/bin/python scripts/consistency_vs_cost.py --out out/consistency_jitter --jitter --record …

Every row samples the same videos with the same seeds (dpmpp_2m, 10 steps, the demo's guidance, 4 frames per
UNet call, so a 16-frame video is 4 chunks): the paper's method (every option off), each consistency option
alone and combined. Scored: appearance drift on exact correspondences (consecutive frames, and the key frame
against every frame; the true frames' own drift is the floor; ``texture``: on the generated person's pixels
only, texture apart from pose error), the flicker ratio, L1, SSIM, pose IoU, and the
cost in image evaluations and seconds per frame. ``--jitter``: the driving DensePose is degraded as an
estimator's would be (each frame moved by up to ``--shift`` px, UV noise of std ``--noise``), the metrics
still against the clean truth, with the UV-smoothing rows.

Writes ``sweep.json`` and ``table.md`` to ``--out``; ``--record`` keeps the result in a JSON file (under
``clean`` / ``jitter_<shift>px_<noise>``, ``_finetune`` added with ``--finetune``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from dreampose.data.world import jitter_uv  # noqa: E402
from dreampose.demo.model import demo_test_scenes, load_demo_model  # noqa: E402
from dreampose.errors import DreamPoseError  # noqa: E402
from dreampose.evaluation.sweep import (Finetune, SweepRow, markdown_table, result_paths, run_sweep,  # noqa: E402
                                       summarise, write_results)
from dreampose.settings import DEMO_SAMPLING  # noqa: E402

REFERENCE = "paper's method"
BASE = DEMO_SAMPLING.replace(sampler="dpmpp_2m", steps=10, frames_per_batch=4)


def _row(name, **options):
    return SweepRow(name, BASE.sampler, BASE.steps, BASE.s_image, BASE.s_pose, **options)


ROWS = [
    _row(REFERENCE),
    _row("reference 1", reference_attention=1.0),
    _row("reference 0.5", reference_attention=0.5),
    _row("cross-frame 1 (first)", cross_frame_attention=1.0),
    _row("cross-frame 1 (previous)", cross_frame_attention=1.0, cross_frame_anchor="previous"),
    _row("reference 1 + cross-frame 1", reference_attention=1.0, cross_frame_attention=1.0),
    _row("reference 0.5 + cross-frame 1", reference_attention=0.5, cross_frame_attention=1.0),
    _row("uv smoothing 1", uv_smoothing=1),
    _row("reference 1 + cross-frame 1 + uv smoothing 1", reference_attention=1.0, cross_frame_attention=1.0,
         uv_smoothing=1),
]
JITTER_ROWS = [
    _row(REFERENCE),
    _row("uv smoothing 1", uv_smoothing=1),
    _row("uv smoothing 2", uv_smoothing=2),
    _row("reference 1 + cross-frame 1", reference_attention=1.0, cross_frame_attention=1.0),
    _row("reference 1 + cross-frame 1 + uv smoothing 1", reference_attention=1.0, cross_frame_attention=1.0,
         uv_smoothing=1),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for sweep.json and table.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subjects", type=int, default=4, help="test-split subjects (videos)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--jitter", action="store_true", help="degrade the driving DensePose (the truth stays clean)")
    p.add_argument("--shift", type=int, default=1, help="--jitter: largest shift of a frame in pixels (default 1)")
    p.add_argument("--noise", type=float, default=0.03, help="--jitter: std of the UV noise (default 0.03)")
    p.add_argument("--rows", choices=("all", "smoothing"), default="all", help="smoothing: only the UV rows")
    p.add_argument("--finetune", action="store_true", help="the demo's subject finetune (100 + 100 steps, lr 1e-4)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace sweep.json / table.md from an earlier run")
    p.add_argument("--record", metavar="JSON", help="also store the result in this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths = result_paths(args.out, force=args.force)
    except DreamPoseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    scenes = demo_test_scenes(args.subjects, args.frames, BASE.height, BASE.width)
    if args.jitter:
        scenes = [replace(s, uv=jitter_uv(s.uv, shift=args.shift, noise=args.noise, seed=i), true_uv=s.uv)
                  for i, s in enumerate(scenes)]
    rows = JITTER_ROWS if args.jitter else ROWS
    if args.rows == "smoothing":
        rows = [r for r in rows if r.name == REFERENCE or r.name.startswith("uv smoothing")]
    model = load_demo_model().place(torch.device("cpu"), torch.float32)
    finetune = Finetune(100, 100, lr=1e-4, vae_lr=1e-4) if args.finetune else None
    t0 = time.perf_counter()
    result = run_sweep(model, scenes, rows, args.seeds, BASE, finetune=finetune, log=lambda m: print(m, flush=True))
    result.update(wall_s=time.perf_counter() - t0, threads=torch.get_num_threads(), base=BASE.to_dict(),
                  jitter={"shift": args.shift, "noise": args.noise} if args.jitter else None)
    table = markdown_table(summarise(result), REFERENCE)
    name = f"jitter_{args.shift}px_{args.noise:g}" if args.jitter else "clean"
    write_results(paths, result, table, args.record, name + ("_finetune" if args.finetune else ""))
    print(table)
    print(f"{len(scenes)} videos × {args.frames} frames × {len(args.seeds)} seeds in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
