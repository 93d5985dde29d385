"""``python -m dreampose``: animate, finetune, convert, demo and bench without ComfyUI.

The stages are the ComfyUI graph's: load the model, encode the subject once, build pose windows,
sample with dual guidance, decode, write PNG frames and an MP4. Every user input is checked before
any weights are read; a bad input prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from ..errors import DreamPoseError

SAMPLER_CHOICES = ("pndm", "ddim", "dpmpp_2m", "euler_a", "unipc")
VIDEO_NAME = "dreampose.mp4"
LATENTS_NAME = "latents.safetensors"
INIT_LATENTS_NAME = "init_latents.safetensors"
RUN_INFO_NAME = "dreampose_run.json"
# demo defaults, picked on the synthetic test split (docs/benchmarks.md)
DEMO_STEPS, DEMO_SAMPLER, DEMO_S_IMAGE, DEMO_S_POSE = 20, "ddim", 3.0, 3.0
DEMO_NOTICE = ("NOTE: the demo model is a small DreamPose (a few MB, shipped in the package) trained with "
               "`python -m dreampose train` on the synthetic world of dreampose/world.py, so it animates synthetic "
               "people only. For real photos use `python -m dreampose animate` with the released DreamPose weights.")


# ----------------------------------------------------------------------------------------------- output

def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Progress:
    """One updating line on a terminal, one line per update otherwise."""

    def __init__(self, label: str, quiet: bool = False, stream=None):
        self.label, self.quiet = label, quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, *_):
        if self.quiet:
            return
        line = f"{self.label} {done}/{total}  {time.perf_counter() - self.t0:.1f} s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------- checks

def _int_at_least(minimum: int):
    """An argparse type: a whole number no smaller than ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _print_json(result: dict, json_out: str | None) -> int:
    """Print a benchmark's JSON (and write it to ``json_out`` when given); exit code 0."""
    text = json.dumps(result, indent=1, default=str)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _check_paths(**paths) -> None:
    """Each given path must exist; the message names the flag."""
    for flag, path in paths.items():
        if path and not os.path.exists(path):
            raise DreamPoseError(f"--{flag.replace('_', '-')}: not found: {path}")


def _check_out_folder(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise DreamPoseError(f"--out {out} is a file; give a folder for the frames and the video")


def _check_weights_given(args) -> None:
    if not args.clip:
        raise DreamPoseError("--clip is required: the CLIP ViT-B/32 vision model (a folder or a .safetensors file)")
    if not args.dreampose and not args.base:
        raise DreamPoseError("give --dreampose (our .safetensors or the authors' unet_epoch_N.pth), "
                             "or --base to build an untrained DreamPose from Stable Diffusion 1.x")


def _load_image(path: str, flag: str = "--image"):
    """An image file → ``[3,H,W]`` uint8 RGB tensor (alpha dropped, greyscale expanded)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise DreamPoseError(f"{flag}: not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise DreamPoseError(f"{flag} {path}: not a readable image ({exc})") from exc
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _image_paths(items: list[str]) -> list[str]:
    """``--images``: files, or one folder whose images are taken in natural order (frame_2 before frame_10)."""
    if len(items) == 1 and os.path.isdir(items[0]):
        folder = items[0]
        names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)), key=_natural_key)
        if not names:
            raise DreamPoseError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return [os.path.join(folder, n) for n in names]
    for path in items:
        if os.path.isdir(path):
            raise DreamPoseError(f"--images: {path} is a folder; give one folder or image files, not both")
        if not os.path.isfile(path):
            raise DreamPoseError(f"--images: not found: {path}")
    return list(items)


def _read_init_latents(path: str, frames: int, height: int, width: int):
    """x_T from a safetensors file (key ``latents``), checked against the run's frames and size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise DreamPoseError(f"--init-latents: not found: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise DreamPoseError(f"--init-latents {path}: not a readable .safetensors file ({exc})") from exc
    if "latents" not in tensors:
        raise DreamPoseError(f"--init-latents {path}: no tensor named 'latents' (found {sorted(tensors)})")
    latents = tensors["latents"]
    want = (4, height // 8, width // 8)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != want or latents.shape[0] not in (1, frames):
        raise DreamPoseError(f"--init-latents {path}: shape {tuple(latents.shape)} does not fit this run; expected "
                             f"[1 or {frames}, 4, {want[1]}, {want[2]}] for {frames} poses at {width}x{height} (WxH)")
    return latents.float()


def _check_run_options(args) -> None:
    from ..pipeline.poses import check_output_size

    check_output_size(args.height, args.width)
    _check_out_folder(args.out)


# ----------------------------------------------------------------------------------------------- pipeline

def _animate(model, image, uv, args, *, device, quiet: bool = False) -> dict:
    """encode → windows → x_T → sample → decode → PNG + MP4 (+ latents). Returns what happened."""
    import torch
    from safetensors.torch import save_file

    from ..pipeline.conditioning import encode_image_condition
    from ..pipeline.poses import make_pose_windows
    from ..pipeline.sampling import SampleStats, decode_latents, sample
    from ..pipeline.video import save_video

    timings = {}
    generator = torch.Generator().manual_seed(args.seed)   # every random draw, in a fixed order
    t0 = time.perf_counter()
    cond = encode_image_condition(image, model.clip, model.vae, model.adapter, convention=model.convention,
                                  latent_mode=args.conditioning_latent, generator=generator)
    poses = make_pose_windows(uv, args.height, args.width)
    x_t = None if args.init_latents_tensor is None else args.init_latents_tensor.to(device)
    timings["encode_s"] = time.perf_counter() - t0

    stats = SampleStats()
    t0 = time.perf_counter()
    latents = sample(model.unet, model.vae, cond, poses, steps=args.steps, sampler=args.sampler,
                     s_image=args.s_image, s_pose=args.s_pose, generator=generator, latents=x_t, start=args.start,
                     frames_per_batch=args.frames_per_batch, scheduler_config=model.scheduler_config,
                     callback=_Progress("sampling: step", quiet), stats=stats)
    timings["sample_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames = decode_latents(model.vae, latents, stretch=args.stretch, callback=_Progress("decoding: frame", quiet))
    timings["decode_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    pngs, mp4 = save_video(frames, args.out, fps=args.fps, video_name=VIDEO_NAME)
    written = {"frames": pngs, "video": mp4}
    stale = sorted(n for n in os.listdir(args.out) if (m := re.match(r"^frame_(\d{4,})\.png$", n))
                   and int(m.group(1)) >= len(pngs))
    if stale:
        _err(f"warning: {args.out} still holds {len(stale)} frame(s) from an earlier, longer run "
             f"({stale[0]} …); they are not part of this video")
    if args.save_latents:
        meta = {"width": str(args.width), "height": str(args.height), "steps": str(args.steps),
                "sampler": args.sampler, "seed": str(args.seed)}
        init_path = os.path.join(args.out, INIT_LATENTS_NAME)
        final_path = os.path.join(args.out, LATENTS_NAME)
        save_file({"latents": stats.init_latents.detach().float().cpu().contiguous()}, init_path, metadata={**meta, "kind": "x_T"})
        save_file({"latents": latents.detach().float().cpu().contiguous()}, final_path,
                  metadata={**meta, "kind": "final"})
        written.update(init_latents=init_path, latents=final_path)
    timings["write_s"] = time.perf_counter() - t0
    return {"frames": len(pngs), "unet_calls": stats.unet_calls, "unet_batch": stats.unet_batch,
            "timings": timings, "written": written, "video": frames}


def _summary(result: dict, args, device, dtype, load_s: float) -> None:
    from ..models.devices import dtype_name

    t = result["timings"]
    n = result["frames"]
    pngs = result["written"]["frames"]
    print(f"wrote {n} frame(s) of {args.width}x{args.height} (WxH) to {args.out}: "
          f"{os.path.basename(pngs[0])} … {os.path.basename(pngs[-1])} and {os.path.basename(result['written']['video'])} "
          f"({args.fps:g} fps)")
    if "latents" in result["written"]:
        print(f"latents: x_T in {result['written']['init_latents']}, final in {result['written']['latents']}")
    print(f"{args.sampler}, {args.steps} steps, s_image {args.s_image:g}, s_pose {args.s_pose:g}, seed {args.seed}, "
          f"{device} {dtype_name(dtype)}: {result['unet_calls']} UNet calls at batch {result['unet_batch']}")
    print(f"time: load {load_s:.1f} s, encode {t['encode_s']:.1f} s, sampling {t['sample_s']:.1f} s "
          f"({t['sample_s'] / n:.2f} s/frame), decode {t['decode_s']:.1f} s, write {t['write_s']:.1f} s")


def _write_run_info(args, result: dict, device, dtype, extra: dict) -> None:
    from ..models.devices import dtype_name

    skip = {"func", "init_latents_tensor", "command"}
    info = {"command": args.command, "options": {k: v for k, v in vars(args).items() if k not in skip},
            "device": str(device), "dtype": dtype_name(dtype), **extra,
            "frames": result["frames"], "unet_calls": result["unet_calls"], "timings": result["timings"]}
    with open(os.path.join(args.out, RUN_INFO_NAME), "w") as f:
        json.dump(info, f, indent=1, default=str)


# ----------------------------------------------------------------------------------------------- commands

def cmd_animate(args) -> int:
    from ..models.devices import place_model, resolve_device, resolve_dtype
    from ..pipeline.poses import load_uv_folder

    # 1. everything the user gave, checked before a single weight is read
    _check_weights_given(args)
    _check_run_options(args)
    _check_paths(clip=args.clip, dreampose=args.dreampose, base=args.base, vae=args.vae, adapter=args.adapter,
                 image=args.image, poses=args.poses, init_latents=args.init_latents, unet_config=args.unet_config,
                 vae_config=args.vae_config)
    for path in args.subject or ():
        _check_paths(subject=path)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    image = _load_image(args.image)
    uv = load_uv_folder(args.poses, args.first_frame, args.max_frames)
    args.init_latents_tensor = (_read_init_latents(args.init_latents, uv.shape[0], args.height, args.width)
                                if args.init_latents else None)
    _err(f"{uv.shape[0]} pose frame(s) from {args.poses}; key frame {image.shape[2]}x{image.shape[1]} (WxH)")

    # 2. weights
    if not args.dreampose:
        _err("warning: no --dreampose weights: building an untrained DreamPose from the base model; its pose "
             "channels start at zero and its adapter is fresh, so the frames will not follow the poses")
    _err("loading weights …")
    t0 = time.perf_counter()
    model = _load_model(args)
    place_model(model, device, dtype)
    load_s = time.perf_counter() - t0
    _err(f"loaded in {load_s:.1f} s; conditioning convention {model.convention!r}")

    # 3. run
    result = _animate(model, image, uv, args, device=device, quiet=args.quiet)
    result.pop("video")
    _write_run_info(args, result, device, dtype, {"convention": model.convention})
    _summary(result, args, device, dtype, load_s)
    return 0


def cmd_demo(args) -> int:
    import numpy as np

    from ..demo.model import DEMO_FILE, demo_scene, finetune_on_key_frame, load_demo_model
    from ..data.densepose import visualize
    from ..models.devices import place_model, resolve_device, resolve_dtype
    from ..evaluation.metrics import pose_alignment
    from ..pipeline.video import contact_sheet, save_image, save_png_frames, to_uint8, write_gif
    from ..data.world import body_mask, silhouette

    _check_run_options(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    scene = demo_scene(args.frames, args.subject, args.motion, args.height, args.width)
    image = _load_image(args.image) if args.image else scene["key_frame"]
    uv = scene["uv"]
    args.init_latents_tensor = (_read_init_latents(args.init_latents, args.frames, args.height, args.width)
                                if args.init_latents else None)
    print(DEMO_NOTICE, flush=True)
    if args.image:
        _err("warning: the demo model only knows the synthetic world; a real photo will not animate well")

    t0 = time.perf_counter()
    model = place_model(load_demo_model(), device, dtype)
    load_s = time.perf_counter() - t0
    finetune_s = 0.0
    if args.image and (args.finetune_steps or args.vae_finetune_steps):
        _err("warning: no DensePose for --image, so no subject finetune; the frames will not look like the photo")
    elif args.finetune_steps or args.vae_finetune_steps:
        t0 = time.perf_counter()
        progress = {"subject": _Progress("finetune UNet+adapter: step", args.quiet),
                    "vae": _Progress("finetune VAE decoder: step", args.quiet)}
        model = finetune_on_key_frame(model, image, scene["key_uv"], steps=args.finetune_steps,
                                      vae_steps=args.vae_finetune_steps, lr=args.finetune_lr, seed=args.seed,
                                      height=args.height, width=args.width,
                                      callback=lambda stage, step, total, loss: progress[stage](step, total))
        finetune_s = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    # the inputs too, so `animate` can be tried on them and a person can see what went in
    save_png_frames(image.permute(1, 2, 0).unsqueeze(0), args.out, pattern="key_frame.png")
    pose_dir = os.path.join(args.out, "poses")
    os.makedirs(pose_dir, exist_ok=True)
    for i, frame in enumerate(uv.numpy()):
        np.save(os.path.join(pose_dir, f"frame_{i}_densepose.npy"), frame)
    for name in os.listdir(pose_dir):   # poses a longer earlier demo left in the demo's own folder
        m = re.match(r"^frame_(\d+)_densepose\.npy$", name)
        if m and int(m.group(1)) >= len(uv):
            os.remove(os.path.join(pose_dir, name))

    result = _animate(model, image, uv, args, device=device, quiet=args.quiet)
    frames = result.pop("video")                                      # [F,H,W,3] 0..1
    alignment = pose_alignment(silhouette(frames.permute(0, 3, 1, 2)), body_mask(uv), shuffle_seed=args.seed)
    gif = write_gif(frames, os.path.join(args.out, "dreampose.gif"), fps=args.fps)
    rows = [visualize(uv), frames, scene["truth"].permute(0, 2, 3, 1)]
    sheet = save_image(contact_sheet(rows), os.path.join(args.out, "contact_sheet.png"))
    side_by_side = [contact_sheet([np.concatenate([to_uint8(row[t]) for row in rows])]) for t in range(len(frames))]
    comparison = write_gif(np.stack(side_by_side), os.path.join(args.out, "comparison.gif"), fps=args.fps)
    result["written"].update(gif=gif, contact_sheet=sheet, comparison=comparison)
    shuffled = alignment["shuffled_iou"]
    result["timings"]["finetune_s"] = finetune_s
    _write_run_info(args, result, device, dtype, {
        "model": os.path.basename(DEMO_FILE), "subject": scene["subject"], "motion": scene["motion"],
        "pose_alignment": {"iou": alignment["iou"], "shuffled_iou": shuffled, "per_frame": alignment["per_frame"]}})
    _summary(result, args, device, dtype, load_s)
    print(f"inputs: {os.path.join(args.out, 'key_frame.png')} and {pose_dir}/frame_N_densepose.npy "
          f"({scene['subject']}, motion {scene['motion']!r}: never seen in training)")
    if finetune_s:
        print(f"subject finetune on the key frame: {args.finetune_steps} UNet+adapter and {args.vae_finetune_steps} "
              f"VAE-decoder steps in {finetune_s:.1f} s")
    print(f"also: {gif}, {sheet} (rows: driving pose, generated, ground truth) and {comparison} (the three side "
          "by side)")
    control = f"{shuffled:.3f}" if shuffled is not None else "n/a (one frame)"
    print(f"pose alignment: IoU {alignment['iou']:.3f} between the generated person and the driving pose; "
          f"{control} against the same poses in a shuffled order")
    return 0


def cmd_convert(args) -> int:
    from ..loaders.load import convert_authors_checkpoint

    if not args.out.lower().endswith(".safetensors"):
        raise DreamPoseError(f"--out {args.out}: the converted file must end in .safetensors")
    if os.path.isdir(args.out):
        raise DreamPoseError(f"--out {args.out} is a folder; give a file name ending in .safetensors")
    if not os.path.isfile(args.unet):
        raise DreamPoseError(f"not found: {args.unet} (the authors' unet_epoch_N.pth)")
    _check_paths(adapter=args.adapter, vae=args.vae, unet_config=args.unet_config, vae_config=args.vae_config)
    unet_config = _read_json(args.unet_config, "--unet-config") if args.unet_config else None
    vae_config = _read_json(args.vae_config, "--vae-config") if args.vae_config else None
    _err("converting …")
    t0 = time.perf_counter()
    path = convert_authors_checkpoint(args.unet, args.out, adapter_path=args.adapter, vae_path=args.vae,
                                      unet_config=unet_config, vae_config=vae_config)
    size = os.path.getsize(path) / 2**20
    print(f"wrote {path} ({size:.1f} MiB, convention 'official'{', with VAE' if args.vae else ''}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args) -> int:
    from ..evaluation.bench import benchmark
    from ..models.devices import resolve_device, resolve_dtype

    real = bool(args.dreampose or args.base)
    if real:
        _check_weights_given(args)
        _check_paths(clip=args.clip, dreampose=args.dreampose, base=args.base, vae=args.vae, adapter=args.adapter)
    width = args.width or (512 if real else 256)
    height = args.height or (640 if real else 256)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    from ..pipeline.poses import check_output_size

    check_output_size(height, width)
    if args.finetune:
        return _bench_finetune(args, real, device, height, width)
    if args.frames % args.frames_per_batch:
        raise DreamPoseError(f"--frames {args.frames} must be a multiple of --frames-per-batch {args.frames_per_batch}")
    if real:
        _err("loading weights …")
        model = _load_model(args)
    else:
        from ..demo.tiny import tiny_dreampose

        model = tiny_dreampose(seed=args.seed)
    result = benchmark(model, device=device, dtype=dtype, height=height, width=width, frames=args.frames,
                       frames_per_batch=args.frames_per_batch, steps=args.steps, sampler=args.sampler,
                       start=args.start, repeats=args.repeats, forward_repeats=args.forward_repeats,
                       seed=args.seed, log=None if args.quiet else (lambda m: _err(f"bench: {m}")))
    return _print_json(result, args.json_out)


# settings flags → FinetuneSettings fields (None: the kind's default)
_SETTING_FLAGS = ("steps", "lr", "batch_size", "seed", "crop", "flip", "gradient_checkpointing", "precision",
                  "optimizer", "lora_rank", "lora_alpha", "height", "width", "crop_prob", "crop_min_scale",
                  "dropout", "decoder_range")


def _finetune_settings(args, kind: str):
    from ..training.finetune import FinetuneSettings, check_settings, vae_settings

    given = {k: getattr(args, k) for k in _SETTING_FLAGS if getattr(args, k, None) is not None}
    settings = FinetuneSettings(**given) if kind == "subject" else vae_settings(**given)
    return check_settings(settings, kind)


class _StepPrinter:
    """``finetune: step 3/500  loss 0.1234  2.1 s`` per step (one updating line on a terminal)."""

    def __init__(self, label: str, quiet: bool):
        self.progress = _Progress(label, quiet)
        self.losses: list[float] = []

    def __call__(self, step: int, total: int, loss: float):
        self.losses.append(loss)
        p = self.progress
        if p.quiet:
            return
        line = f"{p.label} {step}/{total}  loss {loss:.4f}  {time.perf_counter() - p.t0:.1f} s"
        p.stream.write(("\r" + line + ("\n" if step >= total else "")) if p.tty else line + "\n")
        p.stream.flush()


def _finetune_command(args, kind: str) -> int:
    import torch

    from ..models.devices import resolve_device
    from ..training.finetune import finetune_to_file
    from ..pipeline.poses import list_uv_files, load_uv_file

    # 1. inputs and settings, checked before any weights are read
    _check_weights_given(args)
    if not args.out.lower().endswith(".safetensors"):
        raise DreamPoseError(f"--out {args.out}: the finetune is saved as one file ending in .safetensors")
    if os.path.isdir(args.out):
        raise DreamPoseError(f"--out {args.out} is a folder; give a file name ending in .safetensors")
    _check_paths(clip=args.clip, dreampose=args.dreampose, base=args.base, vae=args.vae, adapter=args.adapter,
                 unet_config=args.unet_config, vae_config=args.vae_config)
    settings = _finetune_settings(args, kind)
    device = resolve_device(args.device)
    paths = _image_paths(args.images)
    photos = [_load_image(p, "--images") for p in paths]
    uv = None
    if kind == "subject":
        pose_files = list_uv_files(args.poses)
        if len(pose_files) != len(photos):
            raise DreamPoseError(f"{len(photos)} image(s) but {len(pose_files)} pose file(s) in {args.poses}: give one "
                                 "frame_N_densepose.npy per image, in the same order")
        uv = [load_uv_file(p) for p in pose_files]
    _err(f"{len(photos)} subject image(s){' with their poses' if uv else ''}; training at "
         f"{settings.width}x{settings.height} (WxH), {settings.steps} steps, lr {settings.lr:g}, "
         f"{'LoRA rank ' + str(settings.lora_rank) if settings.lora_rank else 'full'}, {settings.precision}, "
         f"seed {settings.seed}, on {device}")

    # 2. weights: trained copies go to the device; the frozen VAE/CLIP work there, the base UNet stays on the CPU
    _err("loading weights …")
    t0 = time.perf_counter()
    model = _load_model(args)
    model.to("cpu", torch.float32, torch.float32, torch.float32)
    if kind == "subject":
        torch.nn.Module.to(model.vae, device=device)
        torch.nn.Module.to(model.clip, device=device)
    _err(f"loaded in {time.perf_counter() - t0:.1f} s; conditioning convention {model.convention!r}")

    # 3. cache lookup → train → save
    if os.path.isfile(args.out) and not args.force:
        _err(f"{args.out} exists: reused if it holds this very finetune, replaced otherwise")
    label = "finetune: step" if kind == "subject" else "VAE decoder finetune: step"
    printer = _StepPrinter(label, args.quiet)
    base = os.path.basename(args.dreampose or args.base)
    result = finetune_to_file(kind, model, [p.float() / 255 for p in photos], uv, settings, args.out,
                              force=args.force, device=device, callback=printer, base=base)
    if result.cached:
        print(f"{result.path} is up to date: same images{', poses' if uv else ''}, weights and settings (cache key "
              f"{result.cache_key[:12]}…); 0 steps trained. Use --force to train again.")
        return 0
    size = os.path.getsize(result.path) / 2**20
    what = ("UNet+adapter" if kind == "subject" else "VAE decoder") + (
        f", LoRA rank {settings.lora_rank}" if settings.lora_rank else "")
    losses = printer.losses
    k = max(1, min(10, len(losses) // 4))
    print(f"wrote {result.path} ({what}, {size:.1f} MiB): {result.steps_trained} steps in {result.seconds:.1f} s "
          f"({result.seconds / result.steps_trained:.3f} s/step); loss {sum(losses[:k]) / k:.4f} (first {k}) → "
          f"{sum(losses[-k:]) / k:.4f} (last {k})")
    print(f"use it with: animate … --subject {result.path}")
    return 0


def cmd_finetune_subject(args) -> int:
    return _finetune_command(args, "subject")


def cmd_finetune_vae(args) -> int:
    return _finetune_command(args, "vae")


def _bench_finetune(args, real: bool, device, height: int, width: int) -> int:
    from ..evaluation.bench import benchmark_finetune

    if real:
        _err("loading weights …")
        model = _load_model(args)
    else:
        from ..demo.tiny import tiny_dreampose

        model = tiny_dreampose(seed=args.seed)
    result = benchmark_finetune(model, device=device, height=height, width=width, steps=args.finetune_steps,
                                lora_rank=args.lora_rank, precision=args.precision, seed=args.seed,
                                log=None if args.quiet else (lambda m: _err(f"bench: {m}")))
    return _print_json(result, args.json_out)


def _load_model(args):
    from ..loaders.load import load_dreampose

    _check_paths(unet_config=args.unet_config, vae_config=args.vae_config)
    unet_config = _read_json(args.unet_config, "--unet-config") if args.unet_config else None
    vae_config = _read_json(args.vae_config, "--vae-config") if args.vae_config else None
    return load_dreampose(clip=args.clip, dreampose=args.dreampose, base=args.base, vae=args.vae,
                          adapter=args.adapter, convention=args.convention, unet_config=unet_config,
                          vae_config=vae_config, subject=getattr(args, "subject", None))


def _read_json(path: str, flag: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DreamPoseError(f"{flag} {path}: not a readable JSON file ({exc})") from exc


# ----------------------------------------------------------------------------------------------- parser

def _add_weight_args(p, required_clip: bool = False) -> None:
    g = p.add_argument_group("weights")
    g.add_argument("--dreampose", help="our DreamPose .safetensors, or the authors' unet_epoch_N.pth "
                                       "(its adapter_N.pth is found beside it)")
    g.add_argument("--base", help="Stable Diffusion 1.x: a diffusers folder or one .safetensors/.ckpt (gives the "
                                  "VAE and scheduler when the DreamPose file has none)")
    g.add_argument("--clip", help="CLIP ViT-B/32 vision model: a folder (config.json + weights) or one file")
    g.add_argument("--adapter", help="the authors' adapter_N.pth, when not beside unet_epoch_N.pth")
    g.add_argument("--vae", help="a VAE file or folder, e.g. the authors' finetuned vae_N.pth")
    g.add_argument("--convention", choices=("official", "standard"),
                   help="conditioning convention; default: the checkpoint's (authors' files → official)")
    g.add_argument("--unet-config", metavar="JSON", help="UNet config for weights that are not SD 1.x sized "
                                                         "(the authors' .pth files carry none); rarely needed")
    g.add_argument("--vae-config", metavar="JSON", help="VAE config for a .pth/single-file VAE that is not SD 1.x "
                                                        "sized; rarely needed")


def _add_device_args(p) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="UNet/adapter/VAE precision; auto = fp16 on a GPU, fp32 on the CPU (CLIP always fp32)")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU threads for PyTorch (default: PyTorch's choice). On a machine shared with other "
                        "jobs, fewer threads than cores avoids long stalls")


def _add_sampling_args(p, *, width: int, height: int, steps: int, fps: float, frames_per_batch: int = 4,
                       sampler: str = "pndm", s_image: float = 8.0, s_pose: float = 3.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--width", type=int, default=width, help=f"output width, a multiple of 64 (default {width})")
    g.add_argument("--height", type=int, default=height, help=f"output height, a multiple of 64 (default {height})")
    g.add_argument("--steps", type=_positive_int, default=steps, help=f"sampler steps (default {steps})")
    g.add_argument("--sampler", choices=SAMPLER_CHOICES, default=sampler,
                   help=f"default {sampler}" + (", as the authors" if sampler == "pndm" else ""))
    g.add_argument("--s-image", type=_finite_float, default=s_image, help=f"image guidance s_I (default {s_image:g})")
    g.add_argument("--s-pose", type=_finite_float, default=s_pose, help=f"pose guidance s_p (default {s_pose:g})")
    g.add_argument("--seed", type=int, default=0, help="seed for every random draw (default 0)")
    g.add_argument("--start", choices=("official", "noise"), default="official",
                   help="x_T: key frame latent noised to the first step (official) or pure noise")
    g.add_argument("--init-latents", metavar="FILE.safetensors",
                   help="inject x_T from a file (tensor 'latents', [1 or F,4,H/8,W/8]), e.g. a saved init_latents")
    g.add_argument("--conditioning-latent", choices=("sample", "mode"), default="sample",
                   help="VAE latent of the key frame for conditioning: a seeded sample (official) or the mean")
    g.add_argument("--frames-per-batch", type=_positive_int, default=frames_per_batch,
                   help=f"frames sharing one UNet call (batch 3x this; default {frames_per_batch})")
    g.add_argument("--stretch", choices=("none", "per_frame", "sequence"), default="none",
                   help="output min-max stretch; per_frame is the authors' (flickers), default none")
    o = p.add_argument_group("output")
    o.add_argument("--fps", type=_positive_float, default=fps, help=f"video frame rate (default {fps:g})")
    o.add_argument("--save-latents", action="store_true",
                   help=f"also write {INIT_LATENTS_NAME} (x_T, reusable with --init-latents) and "
                        f"{LATENTS_NAME} (final latents), tensor 'latents'")
    o.add_argument("--quiet", action="store_true", help="no per-step progress lines")


def _unit_float(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _add_finetune_parser(sub, name: str, kind: str) -> None:
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
    _add_weight_args(p)
    p.add_argument("--images", required=True, nargs="+", metavar="IMAGE",
                   help="the subject's photos: image files, or one folder of them (natural order)")
    if subject:
        p.add_argument("--poses", required=True,
                       help="folder of frame_N_densepose.npy, one per image, in the images' order")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to save the finetune")
    p.add_argument("--force", action="store_true", help="train even if --out already holds this finetune")
    g = p.add_argument_group("training (defaults: the authors' " + ("subject finetune)" if subject else
                                                                     "VAE decoder finetune)"))
    g.add_argument("--steps", type=_positive_int, help=f"optimizer steps (default {500 if subject else 1500})")
    g.add_argument("--lr", type=_positive_float, help=f"learning rate, AdamW (default {'1e-5' if subject else '5e-5'}"
                                                      f"{'; LoRA usually wants ~1e-4' if subject else ''})")
    g.add_argument("--batch-size", type=_positive_int, help="samples per step (default 1)")
    g.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    g.add_argument("--no-crop", dest="crop", action="store_const", const=False,
                   help="no random crops (default: crop" + (" image and pose with the same box)" if subject else ")"))
    g.add_argument("--flip", action="store_const", const=True, help="random horizontal flips (default off)")
    g.add_argument("--crop-prob", type=_unit_float, help=f"share of samples cropped (default {0.7 if subject else 1})")
    g.add_argument("--crop-min-scale", type=_unit_float,
                   help=f"smallest kept side fraction (default {0.96 if subject else 0.92:g})")
    g.add_argument("--width", type=int, help="training width of the targets, a multiple of 64 (default 512)")
    g.add_argument("--height", type=int, help="training height of the targets, a multiple of 64 (default 640)")
    g.add_argument("--gradient-checkpointing", action="store_const", const=True,
                   help="recompute activations in the backward pass: less memory, slower")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast over fp32 weights (default fp32)")
    g.add_argument("--optimizer", choices=("adamw", "adamw8bit"), help="adamw8bit needs bitsandbytes (default adamw)")
    if subject:
        g.add_argument("--lora-rank", type=_nonnegative_int,
                       help="0: full UNet+adapter finetune (default); >0: LoRA of this rank on the UNet attention "
                            "(the adapter is still trained in full; the file holds only the delta)")
        g.add_argument("--lora-alpha", type=_positive_float, help="LoRA alpha (default: the rank, scale 1)")
        g.add_argument("--dropout", type=_unit_float,
                       help="per-sample conditioning dropout, split pose/image/both (default 0, as the authors)")
    else:
        g.add_argument("--decoder-range", choices=("minus1_1", "0_1"),
                       help="decoder target range: minus1_1 (default, what decoding expects) or 0_1 (the authors', "
                            "washes frames out)")
    p.add_argument("--device", default="auto", help="where to train: auto (CUDA if available, else CPU), cpu, cuda, "
                                                    "cuda:N. Weights stay fp32; --precision picks the arithmetic")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    p.set_defaults(func=cmd_finetune_subject if subject else cmd_finetune_vae)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreampose",
                                     description="DreamPose (Karras et al., ICCV 2023) without ComfyUI.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("animate", help="animate a key frame along a DensePose sequence",
                       description="Key frame + folder of frame_N_densepose.npy → PNG frames and an MP4.")
    _add_weight_args(p)
    p.add_argument("--image", required=True, help="the subject's key frame (any size; conditioning runs at 640x512)")
    p.add_argument("--poses", required=True, help="folder of frame_N_densepose.npy (2,H,W) UV files")
    p.add_argument("--first-frame", type=_nonnegative_int, default=0, help="skip this many pose frames")
    p.add_argument("--max-frames", type=_nonnegative_int, default=0, help="at most this many frames (0 = all)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subject", action="append", metavar="FILE.safetensors",
                   help="a saved subject finetune (finetune-subject / finetune-vae output) applied on top of the "
                        "weights; give it twice for a UNet+adapter and a VAE decoder finetune")
    _add_sampling_args(p, width=512, height=640, steps=100, fps=30.0)
    _add_device_args(p)
    p.set_defaults(func=cmd_animate)

    p = sub.add_parser("demo", help="animate an unseen synthetic person with the shipped demo model (no download)",
                       description="The shipped demo DreamPose (trained on the synthetic world) animates a test-split "
                                   "subject through a motion it never saw. Writes PNG frames, an MP4, a GIF, a "
                                   "contact sheet (driving pose / generated / ground truth) and the pose-alignment "
                                   "IoU against a shuffled pose order.")
    p.add_argument("--out", default="dreampose_demo", help="output folder (default ./dreampose_demo)")
    p.add_argument("--image", help="use this key frame instead of the synthetic subject's")
    p.add_argument("--frames", type=_int_at_least(2), default=16, help="number of pose frames (default 16)")
    p.add_argument("--subject", type=_nonnegative_int, default=0,
                   help="which test-split subject of the synthetic world (default 0)")
    p.add_argument("--motion", help="motion family (walk, sway, wave, turn, dance, pose; default: the subject's)")
    from ..demo.config import (DEMO_FINETUNE_LR, DEMO_FINETUNE_STEPS, DEMO_HEIGHT, DEMO_VAE_FINETUNE_STEPS,
                              DEMO_WIDTH)
    p.add_argument("--finetune-steps", type=_nonnegative_int, default=DEMO_FINETUNE_STEPS,
                   help=f"UNet+adapter finetune steps on the key frame, the paper's subject phase "
                        f"(default {DEMO_FINETUNE_STEPS}; 0: none)")
    p.add_argument("--vae-finetune-steps", type=_nonnegative_int, default=DEMO_VAE_FINETUNE_STEPS,
                   help=f"VAE decoder finetune steps on the key frame (default {DEMO_VAE_FINETUNE_STEPS}; 0: none)")
    p.add_argument("--finetune-lr", type=_positive_float, default=DEMO_FINETUNE_LR,
                   help=f"learning rate of both finetunes (default {DEMO_FINETUNE_LR:g})")
    _add_sampling_args(p, width=DEMO_WIDTH, height=DEMO_HEIGHT, steps=DEMO_STEPS, fps=8.0, frames_per_batch=8,
                       sampler=DEMO_SAMPLER, s_image=DEMO_S_IMAGE, s_pose=DEMO_S_POSE)
    _add_device_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="the authors' unet_epoch_N.pth (+ adapter, VAE) → our .safetensors")
    p.add_argument("unet", help="the authors' unet_epoch_N.pth")
    p.add_argument("--adapter", help="adapter_N.pth (default: the one beside the UNet file)")
    p.add_argument("--vae", help="the authors' vae_N.pth to include (optional)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--unet-config", help="UNet config JSON, for a UNet that is not SD 1.x sized")
    p.add_argument("--vae-config", help="VAE config JSON, for a VAE that is not SD 1.x sized")
    p.set_defaults(func=cmd_convert)

    for name, kind in (("finetune-subject", "subject"), ("finetune-vae", "vae")):
        _add_finetune_parser(sub, name, kind)

    p = sub.add_parser("bench", help="time sampling against bare UNet forwards; prints JSON",
                       description="Tiny random model unless weights are given. Prints JSON on stdout.")
    _add_weight_args(p)
    _add_device_args(p)
    p.add_argument("--width", type=int, help="default 256 (tiny) or 512 (real weights)")
    p.add_argument("--height", type=int, help="default 256 (tiny) or 640 (real weights)")
    p.add_argument("--frames", type=_positive_int, default=8)
    p.add_argument("--frames-per-batch", type=_positive_int, default=4)
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default="pndm")
    p.add_argument("--start", choices=("official", "noise"), default="official")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed sampling runs (median)")
    p.add_argument("--forward-repeats", type=_positive_int, default=1,
                   help="blocks of bare UNet forwards (one chunk's worth each) timed after each sampling run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="also write the JSON to this file")
    p.add_argument("--quiet", action="store_true")
    f = p.add_argument_group("finetuning (--finetune)")
    f.add_argument("--finetune", action="store_true",
                   help="time subject finetuning instead: seconds per step and peak memory for full, "
                        "full+checkpointing, lora and vae (tiny model: 256x256 targets unless --width/--height)")
    f.add_argument("--finetune-steps", type=_int_at_least(2), default=6,
                   help="optimizer steps per mode (default 6; the first is set-up and not in the median)")
    f.add_argument("--lora-rank", type=_positive_int, default=4, help="rank for the lora mode (default 4)")
    f.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.set_defaults(func=cmd_bench)

    from . import eval as cli_eval, prepare as cli_prepare, synth as cli_synth, train as cli_train
    for module in (cli_synth, cli_prepare, cli_train, cli_eval):
        module.add_parser(sub)
    return parser


def _calm_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    On a machine whose cores are shared with other jobs, spinning threads starve each other: the
    tiny demo measured 11–41 s instead of 6.5 s on a busy 2-core box (docs/benchmarks.md). It only
    takes effect if PyTorch is not imported yet, i.e. when this is the program, not a library call.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    _calm_openmp()
    args = build_parser().parse_args(argv)
    threads = None
    try:
        if getattr(args, "threads", None):
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(args.threads)
        return args.func(args)
    except DreamPoseError as exc:
        _err(f"dreampose {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err(f"dreampose {args.command}: interrupted")
        return 130
    finally:
        if threads is not None:   # main() may run inside another program (tests): leave it as found
            import torch

            torch.set_num_threads(threads)
