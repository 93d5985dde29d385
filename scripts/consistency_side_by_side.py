"""The README's side-by-side of issue 12: the demo subject animated by the paper's method and with consistency
options, from the same finetuned model, seed and start noise, each row scored on its own frames.

    .venv/bin/python scripts/consistency_side_by_side.py --out docs/consistency_side_by_side.png

Rows of the picture: the driving DensePose, the ground truth, the paper's method, the options (defaults: the
table's lowest-drift combination, reference 1 + cross-frame 1). The demo's own settings otherwise (its subject
finetune on the key frame, DDIM 20 steps, 8 frames per UNet call). Prints each row's metrics as JSON (also
written next to the picture), so the README's caption quotes the picture's own runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dreampose.data.densepose import visualize  # noqa: E402
from dreampose.demo.model import DEMO_FINETUNE, demo_test_scenes, load_demo_model  # noqa: E402
from dreampose.errors import DreamPoseError  # noqa: E402
from dreampose.evaluation.sweep import SweepRow, result_paths, run_sweep  # noqa: E402
from dreampose.files.atomic import write_text_atomic  # noqa: E402
from dreampose.pipeline.video import contact_sheet, save_image  # noqa: E402
from dreampose.settings import DEMO_FRAMES, DEMO_SAMPLING  # noqa: E402

PAPER = "paper's method"
LABEL_WIDTH = 150


def label_tile(text: str, height: int, width: int = LABEL_WIDTH) -> np.ndarray:
    """A white tile with ``text`` (lines split on "|") written on it, for the left of a row."""
    tile = np.full((height, width, 3), 255, np.uint8)
    lines = text.split("|")
    for i, line in enumerate(lines):
        y = height // 2 + int((i - (len(lines) - 1) / 2) * 18) + 5
        cv2.putText(tile, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def option_name(args) -> str:
    """The options' row name as the table writes it, e.g. "reference 1 + cross-frame 1"."""
    parts = []
    if args.reference_attention:
        parts.append(f"reference {args.reference_attention:g}")
    if args.cross_frame_attention:
        anchor = " (previous)" if args.cross_frame_anchor == "previous" else ""
        parts.append(f"cross-frame {args.cross_frame_attention:g}{anchor}")
    if args.uv_smoothing:
        parts.append(f"uv smoothing {args.uv_smoothing}")
    return " + ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the picture (.png); its metrics go to the same name with .json")
    p.add_argument("--subject", type=int, default=0, help="test-split subject (the demo's default: 0)")
    p.add_argument("--seed", type=int, default=DEMO_SAMPLING.seed)
    p.add_argument("--every", type=int, default=2, help="show every N-th frame (all are scored)")
    p.add_argument("--reference-attention", type=float, default=1.0)
    p.add_argument("--cross-frame-attention", type=float, default=1.0)
    p.add_argument("--cross-frame-anchor", choices=("first", "previous"), default="first")
    p.add_argument("--uv-smoothing", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an earlier picture and its metrics")
    args = p.parse_args(argv)
    if not args.out.lower().endswith(".png") or args.every < 1 or args.subject < 0:
        print("error: --out must name a .png; --every ≥ 1; --subject ≥ 0", file=sys.stderr)
        return 2
    folder, picture = os.path.split(args.out)
    try:      # the picture and its metrics, refused over an earlier run's unless --force
        _, metrics_path = result_paths(folder or ".", (picture, os.path.splitext(picture)[0] + ".json"),
                                       force=args.force)
    except DreamPoseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    base = DEMO_SAMPLING.replace(seed=args.seed)
    options = dict(reference_attention=args.reference_attention, cross_frame_attention=args.cross_frame_attention,
                   cross_frame_anchor=args.cross_frame_anchor, uv_smoothing=args.uv_smoothing)
    name = option_name(args)
    rows = [SweepRow(PAPER, base.sampler, base.steps, base.s_image, base.s_pose),
            SweepRow(name or "every option off", base.sampler, base.steps, base.s_image, base.s_pose, **options)]
    try:
        for row in rows:
            row.options(base, args.seed)
    except DreamPoseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scene = demo_test_scenes(args.subject + 1, DEMO_FRAMES, base.height, base.width)[-1]
    model = load_demo_model().place(torch.device("cpu"), torch.float32)
    frames = {}
    result = run_sweep(model, [scene], rows, [args.seed], base, finetune=DEMO_FINETUNE, frames_out=frames,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    shown = slice(None, None, args.every)
    h = scene.truth.shape[-2]
    sheet_rows = [visualize(scene.uv[shown]), scene.truth[shown].permute(0, 2, 3, 1)]
    sheet_rows += [frames[(row.name, args.seed, scene.name)][shown].permute(0, 2, 3, 1) for row in rows]
    labels = ["driving pose", "ground truth", PAPER, rows[1].name.replace(" + ", " +|")]
    frames_sheet = contact_sheet(sheet_rows)
    label_column = contact_sheet([label_tile(t, h)[None] for t in labels])
    gap = np.full((frames_sheet.shape[0], 2, 3), 255, np.uint8)
    save_image(np.concatenate([label_column, gap, frames_sheet], axis=1), args.out)
    report = {"subject": scene.name, "seed": args.seed, "sampling": base.to_dict(), "finetune": result["finetune"],
              "rows": [{**run, "options": next(r for r in result["rows"] if r["name"] == run["row"])}
                       for run in result["runs"]]}
    write_text_atomic(metrics_path, json.dumps(report, indent=1))
    for run in result["runs"]:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items()}))
    print(f"wrote {args.out} and {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
