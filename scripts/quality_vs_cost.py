"""Quality against cost on the synthetic test split with the shipped demo model (docs/benchmarks.md).

    .venv/bin/python scripts/quality_vs_cost.py --out out/quality            # every row, no finetune
    .venv/bin/python scripts/quality_vs_cost.py --out out/quality_ft --finetune --rows core

``--record docs/quality_vs_cost.json`` also keeps the result there (under ``no_finetune`` / ``finetune``): the
test of the sampling presets checks them against it.

Writes ``sweep.json`` (every run) and ``table.md`` (mean ± sd over seeds) to ``--out`` and prints the table.
Rows: the samplers × steps of the table, guidance limited to an interval of the schedule, and sensitivity
rows that must come out worse. ``--rows`` picks a named subset.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from dreampose.demo.model import demo_test_scenes, load_demo_model  # noqa: E402
from dreampose.errors import DreamPoseError  # noqa: E402
from dreampose.evaluation.sweep import (Finetune, SweepRow, markdown_table, result_paths, run_sweep,  # noqa: E402
                                       summarise, write_results)
from dreampose.settings import DEMO_SAMPLING, SAMPLERS  # noqa: E402

REFERENCE = "pndm 100"
ROWS = [
    SweepRow("pndm 100", "pndm", 100),
    SweepRow("pndm 25", "pndm", 25),
    SweepRow("ddim 20", "ddim", 20),
    SweepRow("ddim 10", "ddim", 10),
    SweepRow("ddim 5", "ddim", 5),
    SweepRow("dpmpp_2m 10", "dpmpp_2m", 10),
    SweepRow("dpmpp_2m 6", "dpmpp_2m", 6),
    SweepRow("dpmpp_2m 4", "dpmpp_2m", 4),
    SweepRow("unipc 10", "unipc", 10),
    SweepRow("unipc 6", "unipc", 6),
    SweepRow("unipc 4", "unipc", 4),
    SweepRow("ddim 10, guided 0-0.5", "ddim", 10, guidance_end=0.5),
    SweepRow("ddim 10, guided 0.3-1", "ddim", 10, guidance_start=0.3),
    SweepRow("dpmpp_2m 6, guided 0-0.5", "dpmpp_2m", 6, guidance_end=0.5),
    SweepRow("dpmpp_2m 6, guided 0.3-1", "dpmpp_2m", 6, guidance_start=0.3),
    SweepRow("unipc 6, guided 0.3-1", "unipc", 6, guidance_start=0.3),
    SweepRow("dpmpp_2m 4, guided 0.3-1", "dpmpp_2m", 4, guidance_start=0.3),
    SweepRow("ddim 2", "ddim", 2, sensitivity=True),
    SweepRow("ddim 1", "ddim", 1, sensitivity=True),
    SweepRow("ddim 20, no guidance", "ddim", 20, s_image=1.0, s_pose=1.0, sensitivity=True),
]
SUBSETS = {"all": [r.name for r in ROWS],
           "core": ["pndm 100", "ddim 20", "dpmpp_2m 10", "dpmpp_2m 6", "dpmpp_2m 6, guided 0.3-1",
                    "unipc 6, guided 0.3-1", "ddim 1", "ddim 20, no guidance"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for sweep.json and table.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subjects", type=int, default=4, help="test-split subjects (videos)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--rows", choices=sorted(SUBSETS), default="all")
    p.add_argument("--finetune", action="store_true", help="the demo's subject finetune (100 + 100 steps, lr 1e-4)")
    p.add_argument("--finetune-steps", type=int, nargs=2, default=[100, 100], metavar=("UNET", "VAE"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace sweep.json / table.md from an earlier run")
    p.add_argument("--record", metavar="JSON",
                   help="also store the result in this file under 'finetune' or 'no_finetune' "
                        "(docs/quality_vs_cost.json: the presets' test reads it)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths = result_paths(args.out, force=args.force)
    except DreamPoseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    assert all(r.sampler in SAMPLERS for r in ROWS)
    rows = [r for r in ROWS if r.name in SUBSETS[args.rows]]
    scenes = demo_test_scenes(args.subjects, args.frames, DEMO_SAMPLING.height, DEMO_SAMPLING.width)
    model = load_demo_model().place(torch.device("cpu"), torch.float32)
    finetune = Finetune(*args.finetune_steps, lr=1e-4, vae_lr=1e-4) if args.finetune else None
    t0 = time.perf_counter()
    result = run_sweep(model, scenes, rows, args.seeds, DEMO_SAMPLING, finetune=finetune,
                       log=lambda m: print(m, flush=True))
    result.update(wall_s=time.perf_counter() - t0, threads=torch.get_num_threads(), base=DEMO_SAMPLING.to_dict())
    table = markdown_table(summarise(result), REFERENCE if any(r.name == REFERENCE for r in rows) else None)
    write_results(paths, result, table, args.record, "finetune" if args.finetune else "no_finetune")
    print(table)
    print(f"{len(scenes)} videos × {args.frames} frames × {len(args.seeds)} seeds in {result['wall_s']:.0f} s; "
          f"finetunes {result['finetune_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
