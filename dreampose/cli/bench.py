"""``python -m dreampose bench``: time sampling against bare UNet forwards (or the finetune modes with
``--finetune``) and print JSON. A tiny random model unless weights are given."""
from __future__ import annotations

from ..errors import DreamPoseError
from ..files.destinations import check_output_file
from ..settings import PAPER_SAMPLING, BenchSettings, FinetuneSettings, check_output_size, check_settings
from .common import (add_device_args, add_options, add_weight_args, check_paths, check_weights_given, err,
                     load_model, options_from_args, print_json)

TINY_SIZE = (256, 256)        # height, width for the tiny model


def register(sub) -> None:
    p = sub.add_parser("bench", help="time sampling against bare UNet forwards; prints JSON",
                       description="Tiny random model unless weights are given. Prints JSON on stdout.")
    add_weight_args(p)
    add_device_args(p)
    p.add_argument("--width", type=int, help=f"default {TINY_SIZE[1]} (tiny) or {PAPER_SAMPLING.width} (real weights)")
    p.add_argument("--height", type=int,
                   help=f"default {TINY_SIZE[0]} (tiny) or {PAPER_SAMPLING.height} (real weights)")
    groups: dict = {}
    add_options(p, BenchSettings, groups=groups)
    p.add_argument("--json-out", help="also write the JSON to this file")
    p.add_argument("--force", action="store_true", help="replace an existing --json-out file")
    p.add_argument("--quiet", action="store_true")
    groups["finetuning (--finetune)"].add_argument(
        "--finetune", action="store_true",
        help="time subject finetuning instead: seconds per step and peak memory for full, full+checkpointing, "
             "lora and vae (tiny model: 256x256 targets unless --width/--height)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo.tiny import tiny_dreampose
    from ..evaluation.bench import benchmark, benchmark_finetune
    from ..models.devices import resolve_device, resolve_dtype

    settings = options_from_args(args, BenchSettings()).check()
    if args.json_out:
        inputs = [(f"--{n}", getattr(args, n, None)) for n in ("dreampose", "base", "clip", "vae", "adapter")]
        check_output_file(args.json_out, "--json-out", inputs=inputs, force=args.force)
    real = bool(args.dreampose or args.base)
    if real:
        check_weights_given(args)
        check_paths(clip=args.clip, dreampose=args.dreampose, base=args.base, vae=args.vae, adapter=args.adapter)
    width = args.width or (PAPER_SAMPLING.width if real else TINY_SIZE[1])
    height = args.height or (PAPER_SAMPLING.height if real else TINY_SIZE[0])
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_output_size(height, width)
    if args.finetune:   # the finetune settings of every mode, before any weights are read
        check_settings(FinetuneSettings(steps=settings.finetune_steps, height=height, width=width,
                                        lora_rank=settings.lora_rank, precision=settings.precision,
                                        seed=settings.seed), "subject")
    if not args.finetune and settings.frames % settings.frames_per_batch:
        raise DreamPoseError(f"--frames {settings.frames} must be a multiple of --frames-per-batch "
                             f"{settings.frames_per_batch}")
    options = PAPER_SAMPLING.replace(width=width, height=height, steps=settings.steps, sampler=settings.sampler,
                                     start=settings.start, frames_per_batch=settings.frames_per_batch,
                                     seed=settings.seed).check()
    if real:
        err("loading weights …")
        model = load_model(args, dtype)   # straight into the benchmarked dtype
    else:
        model = tiny_dreampose(seed=settings.seed)
    log = None if args.quiet else (lambda m: err(f"bench: {m}"))
    if args.finetune:
        result = benchmark_finetune(model, device=device, height=height, width=width, steps=settings.finetune_steps,
                                    lora_rank=settings.lora_rank, precision=settings.precision, seed=settings.seed,
                                    log=log)
    else:
        result = benchmark(model, options, device=device, dtype=dtype, frames=settings.frames,
                           repeats=settings.repeats, forward_repeats=settings.forward_repeats, log=log)
    return print_json(result, args.json_out)
