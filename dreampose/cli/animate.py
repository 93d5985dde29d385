"""``python -m dreampose animate``: a key frame + a folder of DensePose UV → PNG frames and an MP4.

1. Everything the user gave is checked before a single weight is read (a bad input prints one line
   and exits 2). 2. The weights are loaded. 3. :func:`dreampose.pipeline.animate.animate_clip` runs
(encode once → pose windows → dual-guidance sampling → decode), with a live bar per stage.
"""
from __future__ import annotations

import json
import os
import re
import time

from ..errors import DreamPoseError
from ..settings import ANIMATE_FPS, DEFAULT_SAMPLING, SAMPLING_PRESETS, SamplingOptions
from .common import (RUN_INFO_NAME, StepBar, add_device_args, add_options, add_weight_args, check_run_folder,
                     check_paths, check_weights_given, err, frame_range, frame_rate, load_image, load_model,
                     nonnegative_int, options_from_args, read_init_latents)

VIDEO_NAME = "dreampose.mp4"
LATENTS_NAME = "latents.safetensors"
INIT_LATENTS_NAME = "init_latents.safetensors"


def add_sampling_args(p, defaults: SamplingOptions, fps: float, presets: bool = False) -> None:
    """The sampling flags (from :class:`~dreampose.settings.SamplingOptions`), init latents and output.
    ``presets``: a ``--preset`` flag picks the base the other flags change (``sampling_options``)."""
    groups: dict = {}
    add_options(p, SamplingOptions, defaults=defaults, groups=groups, parse_defaults=not presets)
    g = groups["sampling"]
    if presets:
        g.add_argument("--preset", choices=sorted(SAMPLING_PRESETS), default="default",
                       help="the settings the other sampling flags start from: default (dpmpp_2m, 10 steps: 30 "
                            "image evaluations per frame), fast (6 steps, guidance from 0.3 of the schedule on: "
                            "14) or paper (the authors': pndm, 100 steps: 303); measured in docs/benchmarks.md")
    g.add_argument("--init-latents", metavar="FILE.safetensors",
                   help="inject x_T from a file (tensor 'latents', [1 or F,4,H/8,W/8]), e.g. a saved init_latents")
    o = p.add_argument_group("output")
    o.add_argument("--fps", type=frame_rate, default=fps, help=f"video frame rate, 0.1 … 1000 (default {fps:g})")
    o.add_argument("--save-latents", action="store_true",
                   help=f"also write {INIT_LATENTS_NAME} (x_T, reusable with --init-latents) and "
                        f"{LATENTS_NAME} (final latents), tensor 'latents'")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    o.add_argument("--force", action="store_true",
                   help="replace the files another run left in --out (a rerun of the same job replaces its own)")


def register(sub) -> None:
    p = sub.add_parser("animate", help="animate a key frame along a DensePose sequence",
                       description="Key frame + folder of frame_N_densepose.npy → PNG frames and an MP4. Several "
                                   "processes (`torchrun --nproc_per_node N -m dreampose animate …` or `accelerate "
                                   "launch`) split the frames and write what one process would.")
    add_weight_args(p)
    add_job_args(p)
    add_sampling_args(p, DEFAULT_SAMPLING, ANIMATE_FPS, presets=True)
    add_device_args(p)
    p.set_defaults(func=run)


def add_job_args(p) -> None:
    """What one animation is made of beyond the weights: photo, poses, frames, output, subject finetunes
    (the ``batch`` command's manifest entries are these flags)."""
    p.add_argument("--image", required=True, help="the subject's key frame (any size; conditioning runs at 640x512)")
    p.add_argument("--poses", required=True, help="folder of frame_N_densepose.npy (2,H,W) UV files")
    p.add_argument("--first-frame", type=nonnegative_int, default=0, help="skip this many pose frames")
    p.add_argument("--max-frames", type=nonnegative_int, default=0, help="at most this many frames (0 = all)")
    p.add_argument("--frames", type=frame_range, dest="frame_range", metavar="START:END",
                   help="render only frames START … END-1 of the sequence (either side may be empty), each pose "
                        "window still filled from its real neighbours, so they equal those frames of the whole "
                        "run (deterministic samplers); the files keep their frame numbers")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subject", action="append", metavar="FILE.safetensors",
                   help="a saved subject finetune (finetune-subject / finetune-vae output) applied on top of the "
                        "weights; give it twice for a UNet+adapter and a VAE decoder finetune")


def sampling_options(args, defaults: SamplingOptions) -> SamplingOptions:
    """The run's options: the chosen preset (or the command's defaults) with the flags given; checked."""
    preset = getattr(args, "preset", None)
    return options_from_args(args, SAMPLING_PRESETS[preset] if preset else defaults).check()


# what animate writes into --out (a run leaves nothing else there)
OUTPUTS = (re.compile(r"^frame_\d{4,}\.png$"), VIDEO_NAME, RUN_INFO_NAME, LATENTS_NAME, INIT_LATENTS_NAME)


def input_paths(args) -> list[tuple[str, str | None]]:
    """Every file or folder the run reads, as (flag, path): no output may be one of them."""
    pairs = [(f"--{name.replace('_', '-')}", getattr(args, name, None))
             for name in ("image", "poses", "dreampose", "base", "clip", "vae", "adapter", "init_latents")]
    subjects = getattr(args, "subject", None)          # files here; the demo's --subject is a number
    return pairs + [("--subject", path) for path in subjects if isinstance(path, str)] if isinstance(
        subjects, list) else pairs


def check_run_options(args, defaults: SamplingOptions, outputs=OUTPUTS) -> SamplingOptions:
    options = sampling_options(args, defaults)
    check_run_folder(args, outputs, input_paths(args))
    return options


def render(model, image, uv, options: SamplingOptions, args, *, quiet: bool = False, processes=None):
    """animate_clip (or, over several processes, animate_split) with live bars; the whole clip, or None on a
    process other than the main one."""
    import torch

    from ..pipeline.animate import animate_clip

    sampling = StepBar("sampling", quiet)
    decoding = StepBar("decoding", quiet, unit="frame")
    done = [0]

    def on_chunk(chunk, total):
        done[0] += chunk.frames.stop - chunk.frames.start
        decoding(done[0], total)

    frames = getattr(args, "frame_range", None)
    x_t = args.init_latents_tensor
    if processes is not None and processes.world > 1:
        from ..pipeline.split import animate_split

        return animate_split(model, image, uv, options, processes, latents=x_t, callback=sampling,
                             on_chunk=on_chunk, frames=frames)
    generator = torch.Generator().manual_seed(options.seed)   # every random draw, in a fixed order
    return animate_clip(model, image, uv, options, generator=generator, latents=x_t, callback=sampling,
                        on_chunk=on_chunk, frames=frames)


def run_animation(model, image, uv, options: SamplingOptions, args, *, quiet: bool = False) -> dict:
    """animate_clip → PNG + MP4 (+ latents). Returns what happened (frames, UNet calls, timings, files)."""
    return write_animation(render(model, image, uv, options, args, quiet=quiet), uv, options, args)


def write_animation(clip, uv, options: SamplingOptions, args) -> dict:
    """The clip's PNGs, MP4 (and latents) into ``args.out``. Returns what happened (frames, UNet calls, timings,
    files)."""
    from ..files.atomic import atomic_save_safetensors
    from ..pipeline.video import save_video

    frames = getattr(args, "frame_range", None)
    first = frames.indices(uv.shape[0])[0] if frames is not None else 0
    stats = clip.stats
    timings = {"encode_s": stats.encode_s, "sample_s": stats.sample_s, "decode_s": stats.decode_s}

    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    pngs, mp4 = save_video(clip.frames, args.out, fps=args.fps, video_name=VIDEO_NAME, start=first)
    written = {"frames": pngs, "video": mp4}
    stale = sorted(n for n in os.listdir(args.out) if (m := re.match(r"^frame_(\d{4,})\.png$", n))
                   and not first <= int(m.group(1)) < first + len(pngs))
    if stale:
        err(f"warning: {args.out} still holds {len(stale)} frame(s) from an earlier run of other frames "
            f"({stale[0]} …); they are not part of this video")
    if args.save_latents:
        meta = {"width": str(options.width), "height": str(options.height), "steps": str(options.steps),
                "sampler": options.sampler, "seed": str(options.seed)}
        for name, tensor, kind in ((INIT_LATENTS_NAME, stats.init_latents, "x_T"), (LATENTS_NAME, clip.latents,
                                                                                     "final")):
            path = atomic_save_safetensors({"latents": tensor.detach().float()}, os.path.join(args.out, name),
                                           {**meta, "kind": kind})
            written["init_latents" if kind == "x_T" else "latents"] = path
    timings["write_s"] = time.perf_counter() - t0
    return {"frames": len(pngs), "unet_calls": stats.unet_calls, "unet_batch": stats.unet_batch,
            "image_evaluations": stats.image_evaluations, "timings": timings, "written": written, "video": clip.frames}


def summary(result: dict, args, options: SamplingOptions, device, dtype, load_s: float | None) -> None:
    from ..models.devices import dtype_name

    t = result["timings"]
    n = result["frames"]
    pngs = result["written"]["frames"]
    print(f"wrote {n} frame(s) of {options.width}x{options.height} (WxH) to {args.out}: "
          f"{os.path.basename(pngs[0])} … {os.path.basename(pngs[-1])} and "
          f"{os.path.basename(result['written']['video'])} ({args.fps:g} fps)")
    if "latents" in result["written"]:
        print(f"latents: x_T in {result['written']['init_latents']}, final in {result['written']['latents']}")
    print(f"{options.sampler}, {options.steps} steps, s_image {options.s_image:g}, s_pose {options.s_pose:g}, "
          f"seed {options.seed}, {device} {dtype_name(dtype)}: {result['unet_calls']} UNet calls at batch "
          f"{result['unet_batch']}, {result['image_evaluations'] / n:g} image evaluations per frame"
          + (f" (guidance from {options.guidance_start:g} to {options.guidance_end:g} of the schedule)"
             if (options.guidance_start, options.guidance_end) != (0.0, 1.0) else ""))
    load = f"load {load_s:.1f} s, " if load_s is not None else ""
    print(f"time: {load}encode {t['encode_s']:.1f} s, sampling {t['sample_s']:.1f} s "
          f"({t['sample_s'] / n:.2f} s/frame), decode {t['decode_s']:.1f} s, write {t['write_s']:.1f} s")


def write_run_info(args, options: SamplingOptions, result: dict, device, dtype, extra: dict) -> None:
    from ..files.atomic import write_text_atomic
    from ..models.devices import dtype_name

    skip = {"func", "init_latents_tensor", "command"}
    info = {"command": args.command, "options": {k: v for k, v in vars(args).items() if k not in skip},
            "sampling": options.to_dict(), "device": str(device), "dtype": dtype_name(dtype), **extra,
            "frames": result["frames"], "unet_calls": result["unet_calls"],
            "image_evaluations": result["image_evaluations"], "timings": result["timings"]}
    write_text_atomic(os.path.join(args.out, RUN_INFO_NAME), json.dumps(info, indent=1, default=str))


def join_processes(args, device):
    """The processes a launcher started (one without a launcher) and this process's device: with several,
    each process takes its own GPU (the launcher's LOCAL_RANK)."""
    from ..pipeline.processes import Processes, launched_processes

    if launched_processes() <= 1:
        return Processes(), device
    if device.type == "cuda" and str(args.device) not in ("auto", "cuda"):
        raise DreamPoseError(f"--device {args.device}: with several processes each takes its own GPU (the "
                             "launcher's LOCAL_RANK); give --device auto or cuda")
    processes = Processes.from_launcher(cpu=device.type != "cuda")
    return processes, (processes.device if device.type == "cuda" else device)


def check_weight_paths(args) -> None:
    """The weight flags name a model and every file they give exists (nothing is read yet)."""
    check_weights_given(args)
    check_paths(clip=args.clip, dreampose=args.dreampose, base=args.base, vae=args.vae, adapter=args.adapter,
                unet_config=args.unet_config, vae_config=args.vae_config)


def check_job(args):
    """Everything one animation is given besides the weights, checked and read: its options, key frame, UV
    of the whole sequence and the number of frames it renders; ``args.init_latents_tensor`` is set."""
    from ..pipeline.poses import load_uv_folder

    options = check_run_options(args, DEFAULT_SAMPLING)
    check_paths(image=args.image, poses=args.poses, init_latents=args.init_latents)
    for path in args.subject or ():
        check_paths(subject=path)
    if args.subject:
        from ..loaders.subject_file import read_subject_header   # imports diffusers: only when there are some

        for path in args.subject:
            read_subject_header(path)          # a subject file, by its header (cheap)
    image = load_image(args.image)
    uv = load_uv_folder(args.poses, args.first_frame, args.max_frames)
    count = uv.shape[0]
    if args.frame_range is not None:
        start, stop, _ = args.frame_range.indices(count)
        if start >= stop:
            raise DreamPoseError(f"--frames {args.frame_range.start or ''}:{args.frame_range.stop or ''} selects no "
                                 f"frame of the {count} pose frame(s) in {args.poses}")
        count = stop - start
    args.init_latents_tensor = (read_init_latents(args.init_latents, count, options.height, options.width)
                                if args.init_latents else None)
    return options, image, uv, count


def run(args) -> int:
    # 1. everything the user gave, checked before a single weight is read (and before the sampling stack is
    # imported: a typo is answered in about the time PyTorch takes to import)
    check_weight_paths(args)
    options, image, uv, count = check_job(args)

    from ..files.atomic import output_set
    from ..models.devices import resolve_device, resolve_dtype
    from ..pipeline.processes import launched_processes
    from ..pipeline.split import check_split, frame_blocks

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if launched_processes() > 1:
        check_split(options)              # before the processes join: a refused run starts nothing
    processes, device = join_processes(args, device)
    say = err if processes.is_main else (lambda msg: None)
    quiet = args.quiet or not processes.is_main
    say(f"{uv.shape[0]} pose frame(s) from {args.poses}; key frame {image.shape[2]}x{image.shape[1]} (WxH)")
    if processes.world > 1:
        blocks = frame_blocks(count, options.frames_per_batch, processes.world)
        idle = sum(1 for b in blocks if not len(b))
        say(f"{processes.world} processes: frames split in blocks of whole {options.frames_per_batch}-frame chunks "
            f"({', '.join(str(len(b)) for b in blocks)} frames)"
            + (f"; {idle} process(es) idle: fewer --frames-per-batch gives them work" if idle else ""))

    # 2. weights
    if not args.dreampose:
        say("warning: no --dreampose weights: building an untrained DreamPose from the base model; its pose "
            "channels start at zero and its adapter is fresh, so the frames will not follow the poses")
    say("loading weights …")
    t0 = time.perf_counter()
    model = load_model(args, dtype).place(device, dtype)   # read straight into dtype: no second copy
    load_s = time.perf_counter() - t0
    say(f"loaded in {load_s:.1f} s; conditioning convention {model.convention!r}")

    # 3. run: frames, video, latents and the run record appear together, or (error, Ctrl-C) none does;
    # only the main process writes
    clip = render(model, image, uv, options, args, quiet=quiet, processes=processes)
    if not processes.is_main:
        return 0
    with output_set():
        result = write_animation(clip, uv, options, args)
        result.pop("video")
        write_run_info(args, options, result, device, dtype, {"convention": model.convention,
                                                              "processes": processes.world})
    summary(result, args, options, device, dtype, load_s)
    return 0
