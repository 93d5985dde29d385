"""Subject finetune settings against their cost (docs/benchmarks.md): the paper's 500 + 1500 steps against
fewer, with the demo model on the synthetic test split, every video sampled with the default preset's sampler.

    .venv/bin/python scripts/finetune_vs_cost.py --out out/finetune_cost --subjects 2

Writes ``finetune_cost.json`` and ``table.md`` (mean ± sd over seeds, finetune seconds per subject).
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
from dreampose.evaluation.sweep import (METRICS, Finetune, SweepRow, result_paths, run_sweep, summarise,  # noqa: E402
                                       write_results)
from dreampose.settings import DEFAULT_SAMPLING, DEMO_SAMPLING, FinetuneSettings, vae_settings  # noqa: E402

PAPER = Finetune(FinetuneSettings.steps, vae_settings().steps, FinetuneSettings.lr, vae_settings().lr)
CONFIGS = {
    "none": None,
    f"paper {PAPER.steps} + {PAPER.vae_steps} (lr {PAPER.lr:g} / {PAPER.vae_lr:g})": PAPER,
    "100 + 100 (lr 1e-4)": Finetune(100, 100, 1e-4, 1e-4),
    "50 + 50 (lr 1e-4)": Finetune(50, 50, 1e-4, 1e-4),
    "LoRA r16 100 + VAE 100 (lr 1e-4)": Finetune(100, 100, 1e-4, 1e-4, lora_rank=16),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths = result_paths(args.out, ("finetune_cost.json", "table.md"), args.force)
    except DreamPoseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    scenes = demo_test_scenes(args.subjects, args.frames, DEMO_SAMPLING.height, DEMO_SAMPLING.width)
    model = load_demo_model().place(torch.device("cpu"), torch.float32)
    row = SweepRow(f"{DEFAULT_SAMPLING.sampler} {DEFAULT_SAMPLING.steps}", DEFAULT_SAMPLING.sampler,
                   DEFAULT_SAMPLING.steps, DEMO_SAMPLING.s_image, DEMO_SAMPLING.s_pose)
    results = {}
    for name, finetune in CONFIGS.items():
        t0 = time.perf_counter()
        result = run_sweep(model, scenes, [row], args.seeds, DEMO_SAMPLING, finetune=finetune,
                           log=lambda m: print(f"[{name}] {m}", flush=True))
        result["wall_s"] = time.perf_counter() - t0
        results[name] = result
    lines = ["| subject finetune | optimizer steps | finetune s / subject | " + " | ".join(METRICS) + " |",
             "|---" * (3 + len(METRICS)) + "|"]
    for name, result in results.items():
        e = summarise(result)[0]
        f = result["finetune"]
        steps = f["steps"] + f["vae_steps"] if f else 0
        per = result["finetune_s"] / (len(scenes) * len(args.seeds))
        lines.append(f"| {name} | {steps} | {per:.1f} | " + " | ".join(
            f"{e[m]:.4f} ± {e[m + '_sd']:.4f}" for m in METRICS) + " |")
    table = "\n".join(lines) + "\n"
    write_results(paths, results, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
