"""``python -m dreampose train``: stage-1 training of UNet + adapter on prepared videos.

Runs as one process, or distributed, unchanged, under ``accelerate launch -m dreampose train …`` or
``torchrun --nproc_per_node N -m dreampose train …`` (configs in docs/accelerate/). Everything the
user gave is checked before any weights are read. Every flag is a field of
:class:`~dreampose.settings.TrainConfig`.
"""
from __future__ import annotations

import os

from ..errors import DreamPoseError
from ..settings import TrainConfig, options_of
from .common import add_options, err, positive_int, progress_bar


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="stage-1 training of UNet + adapter on prepared videos (accelerate; paper §4)",
        description="Prepared videos (`prepare` or `synth` output) → a DreamPose trained from Stable Diffusion "
                    "1.x + CLIP ViT-B/32, or continued from a DreamPose .safetensors. UNet and adapter train, "
                    "VAE and CLIP stay frozen. One process as is; several with `accelerate launch -m dreampose "
                    "train …` or `torchrun --nproc_per_node N -m dreampose train …` (docs/accelerate/). "
                    "Checkpoints resume exactly (--resume latest).")
    groups: dict = {}
    for title in ("weights", "training", "saving and resuming", "machine"):
        groups[title] = p.add_argument_group(title if title != "training" else "training (defaults: the authors' "
                                                                                  "stage 1)")
    add_options(p, TrainConfig, groups=groups)
    groups["saving and resuming"].add_argument(
        "--force", action="store_true", help="replace files in --out that this run did not write (a log or bundles "
                                             "of another run); an input there is refused even so")
    groups["machine"].add_argument("--threads", type=positive_int, help="CPU threads for PyTorch in each process")
    groups["machine"].add_argument("--quiet", action="store_true", help="no per-step loss lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.run_config import check_config

    given = {o.name: getattr(args, o.name) for o in options_of(TrainConfig) if o.flag}
    # not given: what `accelerate launch` was told (its config file or flag), else full precision
    given["mixed_precision"] = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    config = check_config(TrainConfig(**given))
    if config.resume and config.resume != "latest" and not os.path.isdir(config.resume):
        raise DreamPoseError(f"--resume {config.resume}: not a folder; give 'latest' or a checkpoint folder "
                             f"({os.path.join(config.out, 'checkpoints', 'step_N')})")
    from ..training.stage1 import train   # the training stack, once the options are known good

    bar = None

    def progress(record: dict, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar("train", total, args.quiet)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:g}", refresh=False)
        bar.update(record["step"] - bar.n)

    try:
        result = train(config, log=err, progress=progress, force=args.force)
    finally:
        if bar is not None:
            bar.close()
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
