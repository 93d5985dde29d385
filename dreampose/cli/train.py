"""``python -m dreampose train``: stage-1 training of UNet + adapter on prepared videos.

Runs as one process, or distributed, unchanged, under ``accelerate launch -m dreampose train …`` or
``torchrun --nproc_per_node N -m dreampose train …`` (configs in docs/accelerate/). Everything the
user gave is checked before any weights are read.
"""
from __future__ import annotations

import os
import sys

from ..errors import DreamPoseError

# TrainConfig fields set from flags of the same name
_FIELDS = ("data", "out", "clip", "base", "vae", "init", "steps", "batch_size", "micro_batch", "lr", "seed",
           "height", "width", "pose_window", "conditioning", "dropout", "mixed_precision", "gradient_checkpointing",
           "cache_conditioning", "save_every", "keep", "log_every", "resume", "include_vae", "cpu", "workers",
           "debug_dir")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_train(args) -> int:
    from ..training.stage1 import TrainConfig, check_config, train

    given = {k: getattr(args, k) for k in _FIELDS}
    # not given: what `accelerate launch` was told (its config file or flag), else full precision
    given["mixed_precision"] = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    config = check_config(TrainConfig(**given))
    if config.resume and config.resume != "latest" and not os.path.isdir(config.resume):
        raise DreamPoseError(f"--resume {config.resume}: not a folder; give 'latest' or a checkpoint folder "
                             f"({os.path.join(config.out, 'checkpoints', 'step_N')})")
    result = train(config, log=_say, progress=not args.quiet)
    if result.is_main:
        done = result.steps - result.start_step
        rate = f" ({result.seconds / done:.3f} s/step)" if done else ""
        losses = result.losses
        k = max(1, min(10, len(losses) // 4))
        trend = (f"; loss {sum(losses[:k]) / k:.4f} (first {k}) → {sum(losses[-k:]) / k:.4f} (last {k})"
                 if losses else "")
        print(f"trained steps {result.start_step + 1}–{result.steps} of {config.steps} in {result.seconds:.1f} s"
              f"{rate}{trend}" if done else f"nothing to train: the checkpoint is at step {result.steps}")
        print(f"wrote {result.final_path} (pose window {config.pose_window}, conditioning {config.conditioning}, "
              f"{config.width}x{config.height}); checkpoints in {os.path.join(config.out, 'checkpoints')}")
    return 0


def add_parser(sub) -> None:
    """Register the subcommand on the argparse sub-parsers object."""
    from .main import _nonnegative_int, _positive_float, _positive_int, _unit_float

    p = sub.add_parser(
        "train", help="stage-1 training of UNet + adapter on prepared videos (accelerate; paper §4)",
        description="Prepared videos (`prepare` or `synth` output) → a DreamPose trained from Stable Diffusion "
                    "1.x + CLIP ViT-B/32, or continued from a DreamPose .safetensors. UNet and adapter train, "
                    "VAE and CLIP stay frozen. One process as is; several with `accelerate launch -m dreampose "
                    "train …` or `torchrun --nproc_per_node N -m dreampose train …` (docs/accelerate/). "
                    "Checkpoints resume exactly (--resume latest).")
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="a folder of prepared videos, searched recursively (repeat for several)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder: checkpoints/, dreampose_step_N.safetensors, dreampose.safetensors, "
                        "train_log.jsonl")
    w = p.add_argument_group("weights")
    w.add_argument("--base", help="Stable Diffusion 1.x (diffusers folder or one .safetensors/.ckpt): start a fresh "
                                  "DreamPose (pose weights zero, adapter passing CLIP through)")
    w.add_argument("--init", metavar="FILE.safetensors", help="continue from a DreamPose bundle instead of --base")
    w.add_argument("--clip", help="CLIP ViT-B/32 vision model: a folder or one file (required unless the --init bundle holds one)")
    w.add_argument("--vae", help="a VAE file or folder (default: the bundle's, else the base model's)")
    w.add_argument("--include-vae", action="store_true", help="put the (frozen) VAE into the saved bundles")
    g = p.add_argument_group("training (defaults: the authors' stage 1)")
    g.add_argument("--steps", type=_positive_int, default=10000, help="optimizer steps in total (default 10000)")
    g.add_argument("--batch-size", type=_positive_int, default=16,
                   help="effective batch = micro-batch × accumulation × processes (default 16)")
    g.add_argument("--micro-batch", type=_positive_int, default=2,
                   help="samples per forward pass on each process (default 2); accumulation is computed")
    g.add_argument("--lr", type=_positive_float, default=5e-6, help="AdamW learning rate, constant (default 5e-6)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    g.add_argument("--height", type=int, default=640, help="target height, a multiple of 64 (default 640)")
    g.add_argument("--width", type=int, default=512, help="target width, a multiple of 64 (default 512)")
    g.add_argument("--pose-window", type=int, choices=(5, 1), default=5,
                   help="5: poses j-2..j+2 (default); 1: pose j in all five slots (the paper's 1-pose ablation)")
    g.add_argument("--conditioning", choices=("clip-vae", "clip"), default="clip-vae",
                   help="clip-vae (default) or clip: the paper's CLIP-only ablation (VAE path held at zero)")
    g.add_argument("--dropout", type=_unit_float, default=0.15,
                   help="per-sample conditioning dropout, split image / pose / both (default 0.15 = 5/5/5 %%)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                   help="autocast over fp32 weights through accelerate (default: the accelerate launch config's, "
                        "else no)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    g.add_argument("--cache-conditioning", action="store_true",
                   help="keep each frame's frozen encodings (CLIP tokens, VAE posteriors) and poses in memory "
                        "after first use: much faster on small datasets, memory grows with the dataset")
    g.add_argument("--workers", type=_nonnegative_int, default=2,
                   help="threads reading frames ahead of the training loop (0: none; default 2)")
    s = p.add_argument_group("saving and resuming")
    s.add_argument("--save-every", type=_positive_int, default=500,
                   help="checkpoint + dreampose_step_N.safetensors every N steps (default 500)")
    s.add_argument("--keep", type=_positive_int, default=2, help="checkpoints kept (default 2, the newest)")
    s.add_argument("--resume", metavar="latest|PATH",
                   help="continue a run: 'latest' (the newest complete checkpoint under --out; a fresh start if "
                        "none) or a checkpoint folder")
    s.add_argument("--log-every", type=_positive_int, default=10, help="log the loss every N steps (default 10)")
    m = p.add_argument_group("machine")
    m.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present (gloo when "
                                                      "distributed)")
    m.add_argument("--threads", type=_positive_int, help="CPU threads for PyTorch in each process")
    m.add_argument("--debug-dir", metavar="DIR",
                   help="each process writes rankR.jsonl there: its samples, loss and a parameter digest per step")
    m.add_argument("--quiet", action="store_true", help="no per-step loss lines")
    p.set_defaults(func=cmd_train)
