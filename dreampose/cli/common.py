"""What every command shares: flags built from :mod:`dreampose.settings`, argparse types, messages,
progress bars, and the readers of user inputs (images, JSON configs, injected latents).

Torch-free at import, so ``python -m dreampose --help`` stays instant: heavy modules are imported
inside the functions that need them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import MISSING, replace

from tqdm import tqdm

from ..errors import DreamPoseError
from ..files.paths import IMAGE_SUFFIXES, natural_key, read_json_config, require_flags
from ..settings import DTYPE_CHOICES, CONVENTIONS, OptionInfo, options_of

RUN_INFO_NAME = "dreampose_run.json"
MAX_FPS = 1000.0           # frame rates above this (or below 0.1) make the video writers fail after the sampling


# ----------------------------------------------------------------------------------------------- output

def err(msg: str) -> None:
    """One line on stderr (warnings, progress notes, errors), above any live progress bar."""
    tqdm.write(msg, file=sys.stderr)


def progress_bar(label: str, total: int | None, quiet: bool = False, unit: str = "step", **kw) -> tqdm:
    """One live bar per stage on stderr (``--quiet``: none), as diffusers and accelerate show them."""
    return tqdm(total=total, desc=label, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True,
                leave=True, **kw)


class StepBar:
    """A progress callback ``(done, total, *rest)`` that drives one bar; ``loss`` goes to its postfix."""

    def __init__(self, label: str, quiet: bool = False, unit: str = "step"):
        self.label, self.quiet, self.unit = label, quiet, unit
        self.bar: tqdm | None = None
        self.losses: list[float] = []

    def __call__(self, done: int, total: int, *rest):
        if self.bar is None:
            self.bar = progress_bar(self.label, total, self.quiet, self.unit)
        if rest and isinstance(rest[0], float):
            self.losses.append(rest[0])
            self.bar.set_postfix(loss=f"{rest[0]:.4f}", refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_json(result: dict, json_out: str | None) -> int:
    """Print a benchmark's JSON (and write it to ``json_out`` atomically when given); exit code 0."""
    from ..files.atomic import write_text_atomic

    text = json.dumps(result, indent=1, default=str)
    if json_out:
        write_text_atomic(json_out, text + "\n")
    print(text)
    return 0


# ----------------------------------------------------------------------------------------------- types

def int_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number no smaller than ``minimum`` (and no larger than ``maximum``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            limit = "2**64-1" if maximum == 2 ** 64 - 1 else str(maximum)
            raise argparse.ArgumentTypeError(f"must be at most {limit}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def frame_range(text: str) -> slice:
    """An argparse type: ``START:END`` (END excluded, either side may be empty) → a slice."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 10:20, :8, 40:), got {text!r}") from None
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise argparse.ArgumentTypeError(f"frame numbers are 0 or more, got {text!r}")
    return slice(start, stop)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def frame_rate(text: str) -> float:
    """An argparse type: frames per second a video player can show, 0.1 … 1000."""
    value = finite_float(text)
    if not 0.1 <= value <= MAX_FPS:
        raise argparse.ArgumentTypeError(f"must be from 0.1 to {MAX_FPS:g} frames per second, got {value:g}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


_FLOAT_KINDS = {"positive": positive_float, "unit": unit_float, "finite": finite_float}


def _base_type(annotation):
    """``int | None`` → int; ``list[str]`` → str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (list, tuple):
        return args[0] if args else str
    return args[0] if args and typing.get_origin(annotation) is not None else annotation


def _arg_type(option: OptionInfo):
    base = _base_type(option.type)
    if base is float:
        return _FLOAT_KINDS.get(option.kind, finite_float)
    if base is int:
        if option.minimum is None and option.maximum is None:
            return int
        return int_at_least(option.minimum if option.minimum is not None else -2 ** 63, option.maximum)
    return None


# ----------------------------------------------------------------------------------------------- options

def add_options(parser: argparse.ArgumentParser, cls, names=None, defaults=None, *, parse_defaults: bool = True,
                group=None, groups: dict | None = None, help_defaults=None) -> None:
    """Add the fields of a settings dataclass as flags: name, help, default, type and choices come from
    :mod:`dreampose.settings`.

    Args:
        names: which fields, in this order (default: every field with a flag).
        defaults: an instance whose values are the defaults (e.g. ``DEMO_SAMPLING``).
        parse_defaults: False leaves unset flags None, so a later merge keeps the settings' own
            defaults (and the help still shows them, from ``help_defaults`` or ``defaults``).
        group: add every flag to this argument group; else each field's own ``group``.
        groups: title → argument group, shared by several calls on one parser.
    """
    options = {o.name: o for o in options_of(cls, defaults)}
    shown = {o.name: o for o in options_of(cls, help_defaults)} if help_defaults is not None else options
    groups = groups if groups is not None else {}
    for name in names or [n for n, o in options.items() if o.flag]:
        o = options[name]
        if not o.flag:
            raise ValueError(f"{cls.__name__}.{name} has no command-line flag")
        default = shown[name].default
        text = o.help.format(default=default) if "{default" in o.help and default not in (MISSING, None) else o.help
        kwargs = {"dest": o.name, "help": text}
        if o.choices:
            kwargs["choices"] = o.choices
        extra = dict(o.cli)
        if "action" not in extra:
            kind = _arg_type(o)
            if kind is not None:
                kwargs["type"] = kind
        kwargs.update(extra)
        if "default" not in extra:
            kwargs["default"] = (o.default if o.default is not MISSING else None) if parse_defaults else None
        if kwargs.get("required"):
            kwargs.pop("default", None)
        target = group
        if target is None and o.group:
            if o.group not in groups:
                groups[o.group] = parser.add_argument_group(o.group)
            target = groups[o.group]
        (target or parser).add_argument(o.flag, **kwargs)


def options_from_args(args, base, names=None):
    """``base`` (a settings instance) with every flag the user set (not None) taken from ``args``."""
    names = names or [o.name for o in options_of(type(base)) if o.flag]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return replace(base, **given)


def add_weight_args(p) -> None:
    g = p.add_argument_group("weights")
    g.add_argument("--dreampose", help="our DreamPose .safetensors, or the authors' unet_epoch_N.pth "
                                       "(its adapter_N.pth is found beside it)")
    g.add_argument("--base", help="Stable Diffusion 1.x: a diffusers folder or one .safetensors/.ckpt (gives the "
                                  "VAE and scheduler when the DreamPose file has none)")
    g.add_argument("--clip", help="CLIP ViT-B/32 vision model: a folder (config.json + weights) or one file")
    g.add_argument("--adapter", help="the authors' adapter_N.pth, when not beside unet_epoch_N.pth")
    g.add_argument("--vae", help="a VAE file or folder, e.g. the authors' finetuned vae_N.pth")
    g.add_argument("--convention", choices=CONVENTIONS,
                   help="conditioning convention; default: the checkpoint's (authors' files → official)")
    g.add_argument("--unet-config", metavar="JSON", help="UNet config for weights that are not SD 1.x sized "
                                                         "(the authors' .pth files carry none); rarely needed")
    g.add_argument("--vae-config", metavar="JSON", help="VAE config for a .pth/single-file VAE that is not SD 1.x "
                                                        "sized; rarely needed")


def add_device_args(p, dtype: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    if dtype:
        p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="UNet/adapter/VAE precision; auto = fp16 on a GPU, fp32 on the CPU (CLIP always fp32)")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads for PyTorch (default: PyTorch's choice). On a machine shared with other "
                        "jobs, fewer threads than cores avoids long stalls")


# ----------------------------------------------------------------------------------------------- checks and inputs

def check_paths(**paths) -> None:
    """Each given path must exist; the message names the flag."""
    require_flags(**paths)


# options that change how a run is shown, not what it writes: a rerun that differs only in them is the same job
_NOT_THE_JOB = frozenset({"func", "init_latents_tensor", "command", "quiet", "threads", "force"})


def _job_options(options: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in options.items() if k not in _NOT_THE_JOB}, default=str))


def same_run(args, record: str = RUN_INFO_NAME):
    """``same_job(folder)`` for :func:`~dreampose.files.destinations.check_output_folder`: the folder's
    run record (``dreampose_run.json``, or ``record``) was written by this command with the same options."""
    def same(folder: str) -> bool:
        try:
            with open(os.path.join(folder, record)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return False
        return (isinstance(info, dict) and info.get("command") == args.command
                and isinstance(info.get("options"), dict)
                and _job_options(info["options"]) == _job_options(vars(args)))
    return same


def check_run_folder(args, outputs, inputs, record: str = RUN_INFO_NAME) -> None:
    """``--out`` may take this run's files: none of them there yet, or they are an earlier run of this very
    job (its ``record`` says so), or ``--force``; the folder is none of the inputs and can be written."""
    from ..files.destinations import check_output_folder

    check_output_folder(args.out, "--out", outputs, inputs=inputs, force=getattr(args, "force", False),
                        same_job=same_run(args, record))


def job_record(args) -> dict:
    """The command and its options as a run record stores them (what :func:`same_run` compares)."""
    return {"command": args.command, "options": _job_options(vars(args))}


def check_weights_given(args) -> None:
    """The weight flags name a model: ``--dreampose`` or ``--base``, and CLIP unless the DreamPose file
    carries it. The authors' release folder as ``--dreampose`` means its newest ``unet_epoch_N.pth``."""
    from ..files.weights import bundle_has_clip, newest_authors_unet

    if args.dreampose and os.path.isdir(args.dreampose):
        args.dreampose = newest_authors_unet(args.dreampose)
        err(f"--dreampose: using {args.dreampose} (the newest unet_epoch_N.pth in that folder)")
    if args.dreampose:           # before the CLIP question, which depends on what this file is
        from ..files.weights import PICKLE_SUFFIXES, is_safetensors

        require_flags(dreampose=args.dreampose)
        if not (is_safetensors(args.dreampose) or args.dreampose.lower().endswith(PICKLE_SUFFIXES)):
            raise DreamPoseError(f"--dreampose {args.dreampose}: not a weights file; give our DreamPose "
                                 ".safetensors or the authors' unet_epoch_N.pth")
    if not args.clip and not bundle_has_clip(args.dreampose):
        raise DreamPoseError("--clip is required: the CLIP ViT-B/32 vision model (a folder or a .safetensors file)"
                             + (f"; {args.dreampose} carries none" if args.dreampose else ""))
    if not args.dreampose and not args.base:
        raise DreamPoseError("give --dreampose (our .safetensors or the authors' unet_epoch_N.pth), "
                             "or --base to build an untrained DreamPose from Stable Diffusion 1.x")


def load_image(path: str, flag: str = "--image"):
    """An image file → ``[3,H,W]`` uint8 RGB tensor (alpha dropped, greyscale expanded)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise DreamPoseError(f"{flag} {path} is a folder; give an image file")
    if not os.path.isfile(path):
        raise DreamPoseError(f"{flag}: not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise DreamPoseError(f"{flag} {path}: not a readable image ({exc})") from exc
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def image_paths(items: list[str]) -> list[str]:
    """``--images``: files, or one folder whose images are taken in natural order (frame_2 before frame_10)."""
    if len(items) == 1 and os.path.isdir(items[0]):
        folder = items[0]
        names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)), key=natural_key)
        if not names:
            raise DreamPoseError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return [os.path.join(folder, n) for n in names]
    for path in items:
        if os.path.isdir(path):
            raise DreamPoseError(f"--images: {path} is a folder; give one folder or image files, not both")
        if not os.path.isfile(path):
            raise DreamPoseError(f"--images: not found: {path}")
    return list(items)


def read_init_latents(path: str, frames: int, height: int, width: int):
    """x_T from a safetensors file (key ``latents``), checked against the run's frames and size."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if os.path.isdir(path):
        raise DreamPoseError(f"--init-latents {path} is a folder; give the .safetensors file (e.g. an "
                             "init_latents.safetensors that --save-latents wrote)")
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
    if not latents.is_floating_point() or not torch.isfinite(latents).all():
        raise DreamPoseError(f"--init-latents {path}: the latents must be finite floating-point numbers (found "
                             f"{latents.dtype}{', NaN or infinite values' if latents.is_floating_point() else ''})")
    return latents.float()


def config_flags(args) -> tuple[dict | None, dict | None]:
    """``--unet-config`` / ``--vae-config`` read (None where not given)."""
    check_paths(unet_config=args.unet_config, vae_config=args.vae_config)
    unet_config = read_json_config(args.unet_config, "--unet-config") if args.unet_config else None
    vae_config = read_json_config(args.vae_config, "--vae-config") if args.vae_config else None
    return unet_config, vae_config


def load_model(args, dtype=None):
    """The model the weight flags name (``--subject`` finetunes applied), its UNet, adapter and VAE read
    straight into ``dtype`` when given (:func:`~dreampose.loaders.load.load_dreampose`)."""
    from ..loaders.load import load_dreampose

    unet_config, vae_config = config_flags(args)
    return load_dreampose(clip=args.clip, dreampose=args.dreampose, base=args.base, vae=args.vae,
                          adapter=args.adapter, convention=args.convention, unet_config=unet_config,
                          vae_config=vae_config, subject=getattr(args, "subject", None), dtype=dtype)
