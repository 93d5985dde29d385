"""``python -m dreampose finetune-subject`` and ``finetune-vae``: the paper's subject finetunes (§4.3).

Photos of one person (each with its DensePose, for the UNet + adapter finetune) → one
``.safetensors`` saved atomically; an ``--out`` that already holds this very finetune (same photos,
weights and settings: its cache key) is reused without training unless ``--force``. The training
flags and their defaults are :class:`~dreampose.settings.FinetuneSettings` (the authors' finetunes).
"""
from __future__ import annotations

import os
import time

from ..errors import DreamPoseError
from ..files.destinations import check_output_file
from ..settings import FINETUNE_PRESETS, FinetuneSettings, check_settings, finetune_defaults, finetune_flags
from .common import (StepBar, add_options, add_weight_args, check_paths, check_weights_given, err, image_paths,
                     load_image, load_model, options_from_args, positive_int)

COMMANDS = {"finetune-subject": "subject", "finetune-vae": "vae"}


def register(sub) -> None:
    for name, kind in COMMANDS.items():
        _register(sub, name, kind)


def _register(sub, name: str, kind: str) -> None:
    subject = kind == "subject"
    p = sub.add_parser(
        name, help="finetune UNet + adapter on photos of one subject (paper §4.3)" if subject else
        "finetune the VAE decoder on photos of one subject (paper §4.3)",
        description=("Photos of one person (each with its DensePose) → a subject finetune of the UNet and the "
                     "adapter, saved atomically as one .safetensors. " if subject else
                     "Photos of one person → a finetune of the VAE decoder (encoder frozen), saved atomically as "
                     "one .safetensors. ") +
        "An --out file holding this very finetune (same images, weights and settings) is reused without "
        "training unless --force. Apply the result with `animate --subject FILE`.")
    add_weight_args(p)
    p.add_argument("--images", required=True, nargs="+", metavar="IMAGE",
                   help="the subject's photos: image files, or one folder of them (natural order)")
    if subject:
        p.add_argument("--poses", required=True,
                       help="folder of frame_N_densepose.npy, one per image, in the images' order")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to save the finetune")
    p.add_argument("--force", action="store_true", help="train even if --out already holds this finetune, and "
                                                        "replace an --out file that holds something else")
    g = p.add_argument_group("training (defaults: the fast preset; --preset paper: the authors' "
                             + ("subject finetune)" if subject else "VAE decoder finetune)"))
    g.add_argument("--preset", choices=sorted(FINETUNE_PRESETS), default="fast",
                   help="the settings the other training flags start from: fast (default; " +
                        ("LoRA rank 16, 100 steps, lr 1e-4" if subject else "100 steps, lr 1e-4") +
                        ") or paper (the authors': " + ("500 steps, lr 1e-5, every weight" if subject else
                                                        "1500 steps, lr 5e-5") + "); docs/benchmarks.md")
    add_options(p, FinetuneSettings, finetune_flags(kind),
                parse_defaults=False, help_defaults=finetune_defaults(kind), group=g)
    p.add_argument("--device", default="auto", help="where to train: auto (CUDA if available, else CPU), cpu, cuda, "
                                                    "cuda:N. Weights stay fp32; --precision picks the arithmetic")
    p.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, kind=kind)


def settings_of(args, kind: str) -> FinetuneSettings:
    """The kind's defaults with the flags given, validated."""
    base = finetune_defaults(kind, getattr(args, "preset", None) or "fast")
    return check_settings(options_from_args(args, base, finetune_flags(kind)), kind)


def run(args) -> int:
    import torch

    from ..files.weights import holds_finetune
    from ..models.devices import resolve_device
    from ..pipeline.poses import list_uv_files, load_uv_file

    kind = args.kind
    # 1. inputs and settings, checked before any weights are read
    check_weights_given(args)
    inputs = [("--dreampose", args.dreampose), ("--base", args.base), ("--clip", args.clip), ("--vae", args.vae),
              ("--adapter", args.adapter), ("--poses", getattr(args, "poses", None))]
    inputs += [("--images", p) for p in args.images]
    check_output_file(args.out, "--out", inputs=inputs, force=args.force, suffix=".safetensors",
                      ours=lambda path: holds_finetune(path, kind))
    check_paths(clip=args.clip, dreampose=args.dreampose, base=args.base, vae=args.vae, adapter=args.adapter,
                unet_config=args.unet_config, vae_config=args.vae_config)
    settings = settings_of(args, kind)
    device = resolve_device(args.device)
    paths = image_paths(args.images)
    photos = [load_image(p, "--images") for p in paths]
    uv = None
    if kind == "subject":
        pose_files = list_uv_files(args.poses)
        if len(pose_files) != len(photos):
            raise DreamPoseError(f"{len(photos)} image(s) but {len(pose_files)} pose file(s) in {args.poses}: give one "
                                 "frame_N_densepose.npy per image, in the same order")
        uv = [load_uv_file(p) for p in pose_files]
    err(f"{len(photos)} subject image(s){' with their poses' if uv else ''}; training at "
        f"{settings.width}x{settings.height} (WxH), {settings.steps} steps, lr {settings.lr:g}, "
        f"{'LoRA rank ' + str(settings.lora_rank) if settings.lora_rank else 'full'}, {settings.precision}, "
        f"seed {settings.seed}, on {device}")

    from ..training.finetune import finetune_to_file   # the training stack, once the inputs are known good

    # 2. weights: trained copies go to the device; the frozen VAE/CLIP work there, the base UNet stays on the CPU
    err("loading weights …")
    t0 = time.perf_counter()
    model = load_model(args)
    model.to("cpu", torch.float32, torch.float32, torch.float32)
    if kind == "subject":
        torch.nn.Module.to(model.vae, device=device)
        torch.nn.Module.to(model.clip, device=device)
    err(f"loaded in {time.perf_counter() - t0:.1f} s; conditioning convention {model.convention!r}")

    # 3. cache lookup → train → save
    if os.path.isfile(args.out) and not args.force:
        err(f"{args.out} holds a {kind} finetune: reused if it is this very one (else refused without --force)")
    bar = StepBar("finetune UNet+adapter" if kind == "subject" else "finetune VAE decoder", args.quiet)
    base = os.path.basename(args.dreampose or args.base)
    result = finetune_to_file(kind, model, [p.float() / 255 for p in photos], uv, settings, args.out,
                              force=args.force, overwrite=args.force, device=device, callback=bar, base=base)
    if result.cached:
        print(f"{result.path} is up to date: same images{', poses' if uv else ''}, weights and settings (cache key "
              f"{result.cache_key[:12]}…); 0 steps trained. Use --force to train again.")
        return 0
    size = os.path.getsize(result.path) / 2**20
    what = ("UNet+adapter" if kind == "subject" else "VAE decoder") + (
        f", LoRA rank {settings.lora_rank}" if settings.lora_rank else "")
    losses = bar.losses
    k = max(1, min(10, len(losses) // 4))
    print(f"wrote {result.path} ({what}, {size:.1f} MiB): {result.steps_trained} steps in {result.seconds:.1f} s "
          f"({result.seconds / result.steps_trained:.3f} s/step); loss {sum(losses[:k]) / k:.4f} (first {k}) → "
          f"{sum(losses[-k:]) / k:.4f} (last {k})")
    print(f"use it with: animate … --subject {result.path}")
    return 0
