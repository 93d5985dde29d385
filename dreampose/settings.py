"""Every default, choice list and option of DreamPose, defined once, without PyTorch.

The command line builds its parsers from the dataclasses below (``dreampose.cli.common.add_options``:
flag, default, choices, type and help all come from here), the ComfyUI nodes take their defaults and
combo lists from them, and ``docs/settings.md`` is generated from them (``markdown()``; a test keeps
it current). Importing this module costs nothing, so ``python -m dreampose --help`` stays instant.

Each option is a dataclass field made by :func:`option`: its default, a help text (``{default}`` is
filled in with the default in effect), and optionally the CLI flag, a lower bound, a kind
(``positive``, ``unit``, ``finite``) and the argparse group.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, replace

from .errors import DreamPoseError

# ------------------------------------------------------------------------------ sizes fixed by the method

LATENT_CHANNELS = 4                  # SD 1.x VAE latent channels
POSE_FRAMES = 5                      # DensePose frames per pose window: i−2 … i+2
POSE_CHANNELS = 2 * POSE_FRAMES      # U and V of each
UNET_IN_CHANNELS = LATENT_CHANNELS + POSE_CHANNELS
WINDOW_OFFSETS = tuple(range(-(POSE_FRAMES // 2), POSE_FRAMES // 2 + 1))   # (-2, -1, 0, 1, 2)
ONE_POSE_OFFSETS = (0,) * POSE_FRAMES                                        # the paper's 1-pose ablation
LATENT_SCALE = 8                     # pixels per latent cell
SIZE_MULTIPLE = 64                   # output sizes are multiples of this
MAX_SIZE = 4096                      # largest width or height of a generated frame (the nodes' limit too)
MAX_SEED = 2 ** 64 - 1               # seeds are unsigned 64-bit, as torch.Generator.manual_seed takes them
MAX_GUIDANCE = 30.0                  # s_I and s_p lie in 0..this (the nodes' sliders; the paper uses 3..8)
MAX_LR = 1.0                         # a learning rate above this is a typo, not a setting
MAX_STEPS = 1000                     # sampler steps: at most SD 1.x's num_train_timesteps (the nodes' limit too)
MAX_FINETUNE_STEPS = 100_000         # subject finetune optimizer steps (the nodes' limit; the authors' 500 + 1500)
MAX_FINETUNE_BATCH = 64              # samples per subject finetune step (a few photos, repeated; default 1)
MAX_LORA_RANK = 512                  # LoRA rank (the nodes' limit); the model may allow less: see lora_rank_limit
MAX_BENCH_FRAMES = 1024              # frames one benchmark run samples
MAX_BENCH_REPEATS = 100              # timed runs / forward blocks of a benchmark
MAX_TRAIN_MICRO_BATCH = 256          # stage-1 samples per forward pass and process (the authors': 2)
MAX_TRAIN_BATCH = 65_536             # stage-1 effective batch, accumulation included (the authors': 16)
COND_HEIGHT, COND_WIDTH = 640, 512   # the adapter's Linear(1280, 768) fixes the conditioning branch here
VAE_SCALE = 0.18215                  # a literal in the authors' code, equal to SD 1.x's scaling_factor

# ------------------------------------------------------------------------------ choice lists

CONVENTIONS = ("official", "standard")        # docs/official-code.md, quirks #4 and #5
LATENT_MODES = ("sample", "mode")             # quirk #13
SAMPLERS = ("pndm", "ddim", "dpmpp_2m", "euler_a", "unipc")
START_MODES = ("official", "noise")           # quirk #14
STRETCH_MODES = ("none", "per_frame", "sequence")   # quirk #8
ANCHORS = ("first", "previous")                # cross-frame attention's anchor after the first chunk
MAX_UV_SMOOTHING = 8                           # frames either side
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")     # UNet/adapter
NODE_DTYPE_CHOICES = DTYPE_CHOICES + ("fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")   # ComfyUI stores fp8 weights
VAE_DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
FINETUNE_KINDS = ("subject", "vae")           # UNet + adapter, or the VAE decoder
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
DECODER_RANGES = ("minus1_1", "0_1")
DECODER_LOSSES = ("mse", "l1")
CONDITIONINGS = ("clip-vae", "clip")          # clip: the paper's CLIP-only ablation
POSE_WINDOWS = (5, 1)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
PERSON_CHOICES = ("largest", "highest_score")
DETECT_SHORT_SIDE = 800                       # detectron2 INPUT.MIN_SIZE_TEST
SPLITS = ("train", "val", "test")             # of the synthetic world
MOTIONS = ("walk", "sway", "wave", "turn", "dance", "pose")   # its motion families
BENCH_FINETUNE_MODES = ("full", "full+checkpointing", "lora", "vae")


# ------------------------------------------------------------------------------ options


def option(default=MISSING, help: str = "", *, flag: str | None = "", minimum=None, maximum=None,
           kind: str | None = None,
           choices=None, group: str | None = None, cli: dict | None = None, factory=None, only: str | None = None):
    """A dataclass field carrying what the CLI, the nodes and the docs need to know about it.

    ``flag``: "" derives ``--name-with-dashes``; None keeps the field off the command line.
    ``kind``: ``positive`` (> 0), ``unit`` (0..1), ``finite`` (floats); ``minimum``/``maximum`` for whole
    numbers.
    ``cli``: extra ``argparse.add_argument`` keywords (``nargs``, ``action``, ``metavar``, ``dest``…).
    ``only``: the one variant the option applies to (a finetune kind), where several share the class.
    """
    meta = {"help": help, "flag": flag, "minimum": minimum, "maximum": maximum, "kind": kind, "choices": choices,
            "group": group, "cli": dict(cli or {}), "only": only}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    """One option as the CLI and the docs see it."""

    name: str
    type: typing.Any
    default: typing.Any
    help: str
    flag: str | None
    minimum: int | None
    kind: str | None
    choices: tuple | None
    group: str | None
    cli: dict
    only: str | None = None
    maximum: int | None = None


def options_of(cls, defaults=None) -> list[OptionInfo]:
    """The options of a settings dataclass, with the defaults of ``defaults`` (an instance) if given."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        flag = meta["flag"]
        if flag == "":
            flag = "--" + f.name.replace("_", "-")
        out.append(OptionInfo(f.name, hints[f.name], default, meta["help"], flag, meta["minimum"], meta["kind"],
                              meta["choices"], meta["group"], meta["cli"], meta["only"], meta["maximum"]))
    return out


def check_output_size(height: int, width: int) -> None:
    """Output sizes are positive multiples of 64 (the UNet halves the latent three times), at most
    :data:`MAX_SIZE`: checked before any work, where a huge size would only fail after minutes."""
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise DreamPoseError(
            f"output size {width}×{height} (W×H) is not a multiple of 64; pick e.g. 512×640, the size "
            "DreamPose was trained at")
    if height > MAX_SIZE or width > MAX_SIZE:
        raise DreamPoseError(f"output size {width}×{height} (W×H) is larger than {MAX_SIZE}×{MAX_SIZE}; "
                             "DreamPose was trained at 512×640")


def check_guidance(scale, what: str) -> float:
    """A guidance scale: finite, 0 … :data:`MAX_GUIDANCE` (1 = that branch's guidance off)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= MAX_GUIDANCE:
        raise DreamPoseError(f"{what} must be a number from 0 to {MAX_GUIDANCE:g}, got {scale!r} (the paper uses "
                             "3 to 8; 1 turns that guidance off)")
    return float(scale)


def check_guidance_interval(start, end) -> tuple[float, float]:
    """Where guidance applies, as fractions of the schedule: 0 ≤ start ≤ end ≤ 1."""
    for value, what in ((start, "guidance_start"), (end, "guidance_end")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise DreamPoseError(f"{what} must be a fraction of the schedule from 0 to 1, got {value!r}")
    if start > end:
        raise DreamPoseError(f"guidance_start ({start:g}) is after guidance_end ({end:g}): the interval is empty; "
                             "use 0 and 1 for guidance at every step")
    return float(start), float(end)


def check_seed(seed, what: str = "seed") -> int:
    """A whole number 0 … 2**64−1 (what ``torch.Generator.manual_seed`` accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise DreamPoseError(f"{what} must be a whole number from 0 to 2**64-1, got {seed!r}")
    return seed


def check_choice(value, choices, what: str):
    """``value`` if it is one of ``choices``, else a DreamPoseError naming ``what`` and the choices."""
    if value not in choices:
        raise DreamPoseError(f"unknown {what} {value!r}; use one of {tuple(choices)}")
    return value


def check_convention(convention: str) -> str:
    return check_choice(convention, CONVENTIONS, "conditioning convention")


def check_latent_mode(latent_mode: str) -> str:
    return check_choice(latent_mode, LATENT_MODES, "conditioning latent")


def check_sampler(sampler: str) -> str:
    return check_choice(sampler, SAMPLERS, "sampler")


def check_consistency(reference: float, cross_frame: float, anchor: str, uv_smoothing: int) -> None:
    """The temporal-consistency options: blend weights in 0..1, a known anchor, a smoothing radius in frames."""
    for name, value in (("reference_attention", reference), ("cross_frame_attention", cross_frame)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise DreamPoseError(f"{name} is a blend weight in 0..1 (0: off), got {value!r}")
    check_choice(anchor, ANCHORS, "cross-frame anchor")
    if isinstance(uv_smoothing, bool) or not isinstance(uv_smoothing, int) or not 0 <= uv_smoothing <= MAX_UV_SMOOTHING:
        raise DreamPoseError(f"uv_smoothing is a number of frames in 0..{MAX_UV_SMOOTHING}, got {uv_smoothing!r}")


def check_sampling_steps(steps, what: str = "steps") -> int:
    """Sampler steps: a whole number 1 … :data:`MAX_STEPS`, the SD 1.x schedule's training timesteps (a sampler
    cannot take more steps than the schedule has; some fail only at the last step, after all the work)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise DreamPoseError(f"{what} must be a whole number from 1 to {MAX_STEPS} (the noise schedule's "
                             f"{MAX_STEPS} training timesteps), got {steps!r}; 10 to 100 is usual")
    return steps


def check_start(start: str) -> str:
    return check_choice(start, START_MODES, "start mode")


def check_stretch(stretch: str) -> str:
    return check_choice(stretch, STRETCH_MODES, "stretch")


def check_kind(kind: str) -> str:
    """``subject`` (UNet + adapter) or ``vae`` (VAE decoder)."""
    return check_choice(kind, FINETUNE_KINDS, "finetune kind")


# ------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class SamplingOptions:
    """How frames are generated: size, sampler, dual guidance, start latent, seed, output stretch.

    The defaults are the authors' demo settings (PNDM, 100 steps, s_I 8, s_p 3; docs/official-code.md).
    """

    width: int = option(512, "output width, a multiple of 64 (default {default})", group="sampling")
    height: int = option(640, "output height, a multiple of 64 (default {default})", group="sampling")
    steps: int = option(100, "sampler steps, at most " + str(MAX_STEPS) + " (default {default})", minimum=1,
                        maximum=MAX_STEPS, group="sampling")
    sampler: str = option("pndm", "scheduler on the SD 1.x noise schedule; pndm is the authors' (default {default})",
                          choices=SAMPLERS, group="sampling")
    s_image: float = option(8.0, "image guidance s_I (default {default:g})", kind="finite", group="sampling")
    s_pose: float = option(3.0, "pose guidance s_p (default {default:g})", kind="finite", group="sampling")
    seed: int = option(0, "seed for every random draw (default {default})", minimum=0, maximum=MAX_SEED,
                       group="sampling")
    start: str = option("official", "x_T: the key frame latent noised to the first step (official) or pure noise "
                                    "(default {default})", choices=START_MODES, group="sampling")
    conditioning_latent: str = option(
        "sample", "VAE latent of the key frame for conditioning: a seeded sample (official) or the mean "
                  "(default {default})", choices=LATENT_MODES, group="sampling")
    frames_per_batch: int = option(4, "frames sharing one UNet call (batch 3x this; default {default})", minimum=1,
                                   group="sampling")
    stretch: str = option("none", "output min-max stretch; per_frame is the authors' (flickers), default {default}",
                          choices=STRETCH_MODES, group="sampling")
    guidance_start: float = option(
        0.0, "guidance only from this fraction of the schedule on (0: the first, noisiest step; default {default:g}); "
             "outside the interval one UNet branch instead of three", kind="unit", group="sampling")
    guidance_end: float = option(
        1.0, "guidance only up to this fraction of the schedule (1: the last step; default {default:g})", kind="unit",
        group="sampling")
    reference_attention: float = option(
        0.0, "reference attention: every frame's self-attention also attends to the subject photo's features at the "
             "same step, blended with this weight (0: off, 1: full; default {default:g}; one more UNet row per "
             "guidance branch in each call)", kind="unit", group="consistency")
    cross_frame_attention: float = option(
        0.0, "cross-frame attention: every frame's self-attention also attends to an anchor frame's, blended with this "
             "weight (0: off; default {default:g})", kind="unit", group="consistency")
    cross_frame_anchor: str = option(
        "first", "the anchor of cross-frame attention after the first chunk: the video's first frame or the previous "
                 "chunk's last, noised to each step (within the first chunk: its first frame; default {default})",
        choices=ANCHORS, group="consistency")
    uv_smoothing: int = option(
        0, "temporal smoothing of the DensePose UV over +-N frames, per body part (0: off; default {default})",
        minimum=0, maximum=MAX_UV_SMOOTHING, group="consistency")

    def check(self) -> SamplingOptions:
        """Every field valid, or a DreamPoseError naming the first wrong one."""
        check_output_size(self.height, self.width)
        check_seed(self.seed)
        check_guidance(self.s_image, "s_image")
        check_guidance(self.s_pose, "s_pose")
        check_sampling_steps(self.steps)
        if self.frames_per_batch < 1:
            raise DreamPoseError(f"frames per UNet call must be at least 1, got {self.frames_per_batch}")
        check_sampler(self.sampler)
        check_start(self.start)
        check_stretch(self.stretch)
        check_latent_mode(self.conditioning_latent)
        check_guidance_interval(self.guidance_start, self.guidance_end)
        check_consistency(self.reference_attention, self.cross_frame_attention, self.cross_frame_anchor,
                          self.uv_smoothing)
        return self

    def replace(self, **changes) -> SamplingOptions:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


PAPER_SAMPLING = SamplingOptions()
# Chosen on the quality-vs-cost table (docs/benchmarks.md, docs/quality_vs_cost.json): every metric within seed
# noise of the authors' PNDM 100 steps, with and without the subject finetune. At the paper's s_I 8 / s_p 3:
# 30 image evaluations per frame (default) and 14 (fast: guidance from 0.3 of the schedule on), against 303.
DEFAULT_SAMPLING = PAPER_SAMPLING.replace(sampler="dpmpp_2m", steps=10)
FAST_SAMPLING = PAPER_SAMPLING.replace(sampler="dpmpp_2m", steps=6, guidance_start=0.3)
SAMPLING_PRESETS = {"default": DEFAULT_SAMPLING, "fast": FAST_SAMPLING, "paper": PAPER_SAMPLING}
# The demo's: picked on the synthetic test split (docs/benchmarks.md), at the demo model's training size.
DEMO_HEIGHT, DEMO_WIDTH = 192, 128
DEMO_SAMPLING = SamplingOptions(width=DEMO_WIDTH, height=DEMO_HEIGHT, steps=20, sampler="ddim", s_image=3.0,
                                s_pose=3.0, frames_per_batch=8)
ANIMATE_FPS, DEMO_FPS = 30.0, 8.0    # frame rate of the written video
DEMO_FRAMES = 16                     # frames of the demo's motion


# ------------------------------------------------------------------------------ subject finetuning


# settings that cannot change the result (gradient checkpointing recomputes the same forward)
_NOT_IN_CACHE_KEY = ("gradient_checkpointing",)
_LATER_FIELDS = {"clip_only": False, "decoder_loss": "mse", "decoder_blend": 1.0}   # in the cache key off default


@dataclass
class FinetuneSettings:
    """How to finetune on a subject (paper §4.3). Defaults: the authors' UNet + adapter finetune;
    :func:`vae_settings` gives their VAE decoder finetune."""

    steps: int = option(500, "optimizer steps (default {default})", minimum=1, maximum=MAX_FINETUNE_STEPS)
    lr: float = option(1e-5, "learning rate, AdamW (default {default:g})", kind="positive")
    batch_size: int = option(1, "samples per step, at most " + str(MAX_FINETUNE_BATCH) + " (default {default})",
                             minimum=1, maximum=MAX_FINETUNE_BATCH)
    seed: int = option(0, "seed of every random draw (default {default})", minimum=0, maximum=MAX_SEED)
    crop: bool = option(True, "no random crops (default: crop image and pose with the same box)", flag="--no-crop",
                        cli={"action": "store_const", "const": False})
    flip: bool = option(False, "random horizontal flips (default off)", cli={"action": "store_const", "const": True})
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, slower",
                                          cli={"action": "store_const", "const": True})
    precision: str = option("fp32", "autocast over fp32 weights (default {default})", choices=PRECISIONS)
    optimizer: str = option("adamw", "adamw8bit needs bitsandbytes (default {default})", choices=OPTIMIZERS)
    lora_rank: int = option(0, "0: full UNet+adapter finetune (default); >0: LoRA of this rank on the UNet attention "
                               "(the adapter is still trained in full; the file holds only the delta), at most "
                               + str(MAX_LORA_RANK) + " and the attention layers' width", minimum=0,
                            maximum=MAX_LORA_RANK, only="subject")

    height: int = option(640, "training height of the targets, a multiple of 64 (default {default})")
    width: int = option(512, "training width of the targets, a multiple of 64 (default {default})")
    crop_prob: float = option(0.7, "share of samples cropped (default {default:g})", kind="unit")
    crop_min_scale: float = option(0.96, "smallest kept side fraction (default {default:.2g})", kind="unit")
    dropout: float = option(0.0, "per-sample conditioning dropout, split pose/image/both (default {default:g}, as "
                                 "the authors)", kind="unit", only="subject")
    lora_alpha: float = option(0.0, "LoRA alpha (default: the rank, scale 1)", kind="positive", only="subject")
    weight_decay: float = option(1e-2, "AdamW weight decay", flag=None)
    max_grad_norm: float = option(1.0, "gradient-norm clip (0: none)", flag=None)
    decoder_range: str = option("minus1_1", "decoder target range: minus1_1 (default, what decoding expects) or 0_1 "
                                            "(the authors', washes frames out)", choices=DECODER_RANGES,
                                  only="vae")
    clip_only: bool = option(False, "keep the adapter's VAE-token weights at zero (the paper's CLIP-only "
                                    "ablation)", flag=None)
    decoder_loss: str = option("mse", "decoder reconstruction loss: mse (default, the authors') or l1 (less of a "
                                      "rim around the body on other poses)", choices=DECODER_LOSSES, only="vae")
    decoder_blend: float = option(1.0, "share of the finetune's weight change kept: decoder = base + blend·(finetuned "
                                       "− base), in (0, 1] (default {default:g}: all of it, the authors')",
                                  kind="unit", only="vae")

    def to_dict(self) -> dict:
        return asdict(self)

    def cache_fields(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_CACHE_KEY}
        # added later: at their defaults, leave the keys of subjects saved before them unchanged
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        return fields

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha or self.lora_rank)


# what a VAE decoder finetune changes from the defaults: the authors' 1500 steps at lr 5e-5, every
# sample cropped, down to 589/640 of the side
VAE_FINETUNE_DEFAULTS = {"steps": 1500, "lr": 5e-5, "crop_prob": 1.0, "crop_min_scale": 589 / 640}


def vae_settings(**kw) -> FinetuneSettings:
    """Settings for the VAE decoder finetune: the authors' 1500 steps at lr 5e-5, every sample cropped
    up to 589/640 of the side. (Theirs were 1500 micro-batches of one photo accumulated 4 at a time;
    here 1500 optimizer steps of ``batch_size`` samples.)"""
    return FinetuneSettings(**{**VAE_FINETUNE_DEFAULTS, **kw})


def finetune_flags(kind: str) -> tuple[str, ...]:
    """The fields the command line offers for a finetune kind: every flagged one not meant for the other."""
    check_kind(kind)
    return tuple(o.name for o in options_of(FinetuneSettings) if o.flag and o.only in (None, kind))


# Chosen on the finetune-vs-cost table (docs/benchmarks.md, docs/finetune_vs_cost.json): a LoRA of the UNet
# attention (rank 16) rather than a full finetune, so a high learning rate on one photo cannot wreck SD-sized
# weights, and 100 + 100 steps instead of the authors' 500 + 1500, every metric within seed noise of theirs.
FINETUNE_PRESETS = {
    "fast": {"subject": FinetuneSettings(steps=100, lr=1e-4, lora_rank=16), "vae": vae_settings(steps=100, lr=1e-4)},
    "paper": {"subject": FinetuneSettings(), "vae": vae_settings()},
}


def finetune_defaults(kind: str, preset: str = "fast") -> FinetuneSettings:
    """The defaults of a finetune kind (``subject``: UNet + adapter, ``vae``: VAE decoder) in a preset:
    ``fast`` (the default) or ``paper`` (the authors' finetunes)."""
    return FINETUNE_PRESETS[check_choice(preset, FINETUNE_PRESETS, "finetune preset")][check_kind(kind)]


def _whole(value, low: int, high: int) -> bool:
    """A whole number (not a bool) in ``low`` … ``high``."""
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def check_settings(settings: FinetuneSettings | None, kind: str = "subject") -> FinetuneSettings:
    """Validate (and default) settings; a DreamPoseError naming the bad field."""
    check_kind(kind)
    if settings is None:
        settings = finetune_defaults(kind)
    if not isinstance(settings, FinetuneSettings):
        raise DreamPoseError(f"settings must be a FinetuneSettings, got {type(settings).__name__}")
    s = settings
    problems = []
    if not _whole(s.steps, 1, MAX_FINETUNE_STEPS):
        problems.append(f"steps must be a whole number from 1 to {MAX_FINETUNE_STEPS} (got {s.steps!r}; the "
                        "authors used 500 and 1500)")
    if not (s.lr > 0 and s.lr <= MAX_LR):
        problems.append(f"lr must be a positive number no larger than {MAX_LR:g} (got {s.lr!r})")
    if not _whole(s.batch_size, 1, MAX_FINETUNE_BATCH):
        problems.append(f"batch_size must be a whole number from 1 to {MAX_FINETUNE_BATCH} (got {s.batch_size!r}; "
                        "the authors used 1)")
    if s.precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS} (got {s.precision!r})")
    if s.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {OPTIMIZERS} (got {s.optimizer!r})")
    if not _whole(s.lora_rank, 0, MAX_LORA_RANK):
        problems.append(f"lora_rank must be 0 (full finetune) or a rank from 1 to {MAX_LORA_RANK} (got "
                        f"{s.lora_rank!r}; 4 to 64 is usual, the fast preset uses 16)")
    elif s.lora_rank and kind == "vae":
        problems.append("the VAE decoder finetune is always full: lora_rank must be 0")
    if not (isinstance(s.lora_alpha, (int, float)) and math.isfinite(s.lora_alpha) and s.lora_alpha >= 0):
        problems.append(f"lora_alpha must be a finite number ≥ 0 (got {s.lora_alpha!r})")
    if not 0 <= s.crop_prob <= 1:
        problems.append(f"crop_prob must be in 0..1 (got {s.crop_prob!r})")
    if not 0 < s.crop_min_scale <= 1:
        problems.append(f"crop_min_scale must be in (0, 1] (got {s.crop_min_scale!r})")
    if not 0 <= s.dropout < 1:
        problems.append(f"dropout must be in [0, 1) (got {s.dropout!r})")
    if s.weight_decay < 0 or s.max_grad_norm < 0:
        problems.append("weight_decay and max_grad_norm must be ≥ 0")
    if s.decoder_range not in DECODER_RANGES:
        problems.append(f"decoder_range must be one of {DECODER_RANGES} (got {s.decoder_range!r})")
    if s.decoder_loss not in DECODER_LOSSES:
        problems.append(f"decoder_loss must be one of {DECODER_LOSSES} (got {s.decoder_loss!r})")
    if isinstance(s.decoder_blend, bool) or not isinstance(s.decoder_blend, (int, float)) \
            or not 0 < s.decoder_blend <= 1:
        problems.append(f"decoder_blend must be a number in (0, 1] (got {s.decoder_blend!r}; 1 keeps the whole "
                        "finetune, the demo uses 0.6)")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed <= MAX_SEED:
        problems.append(f"seed must be a whole number from 0 to 2**64-1 (got {s.seed!r})")
    if problems:
        raise DreamPoseError("finetune settings: " + "; ".join(problems))
    check_output_size(s.height, s.width)
    return s


# The demo's subject finetune on its key frame: the paper's second phase, short, at a learning rate
# sized for a model trained at 5e-4.
DEMO_FINETUNE_STEPS, DEMO_VAE_FINETUNE_STEPS, DEMO_FINETUNE_LR = 100, 100, 1e-4
# Its decoder finetune keeps 0.6 of an L1 finetune's weight change: the whole MSE change paints a rim of body
# colour around the other poses (pose IoU 0.81 against 0.86 on test subject 0, docs/benchmarks.md).
DEMO_DECODER_LOSS, DEMO_DECODER_BLEND = "l1", 0.6


# ------------------------------------------------------------------------------ stage-1 training


@dataclass
class TrainConfig:
    """One stage-1 run. ``data``: roots of prepared videos; weights: ``base`` (SD 1.x) or ``init``
    (our bundle) plus ``clip`` (and optionally ``vae``). Defaults: the authors' stage 1."""

    data: list[str] = option(help="a folder of prepared videos, searched recursively (repeat for several)",
                             cli={"action": "append", "required": True, "metavar": "DIR"})
    out: str = option(help="run folder: checkpoints/, dreampose_step_N.safetensors, dreampose.safetensors, "
                           "train_log.jsonl", cli={"required": True, "metavar": "DIR"})
    clip: str | None = option(None, "CLIP ViT-B/32 vision model: a folder or one file (required unless the --init "
                                    "bundle holds one)", group="weights")
    base: str | None = option(None, "Stable Diffusion 1.x (diffusers folder or one .safetensors/.ckpt): start a "
                                    "fresh DreamPose (pose weights zero, adapter passing CLIP through)",
                              group="weights")
    vae: str | None = option(None, "a VAE file or folder (default: the bundle's, else the base model's)",
                             group="weights")
    init: str | None = option(None, "continue from a DreamPose bundle instead of --base", group="weights",
                              cli={"metavar": "FILE.safetensors"})
    steps: int = option(10000, "optimizer steps in total (default {default})", minimum=1, group="training")
    batch_size: int = option(16, "effective batch = micro-batch × accumulation × processes (default {default})",
                             minimum=1, maximum=MAX_TRAIN_BATCH, group="training")
    micro_batch: int = option(2, "samples per forward pass on each process (default {default}); accumulation is "
                                 "computed", minimum=1, maximum=MAX_TRAIN_MICRO_BATCH, group="training")
    lr: float = option(5e-6, "AdamW learning rate, constant (default {default:g})", kind="positive",
                       group="training")
    seed: int = option(0, "seed of every random draw (default {default})", minimum=0, maximum=MAX_SEED,
                       group="training")
    height: int = option(640, "target height, a multiple of 64 (default {default})", group="training")
    width: int = option(512, "target width, a multiple of 64 (default {default})", group="training")
    pose_window: int = option(5, "5: poses j-2..j+2 (default); 1: pose j in all five slots (the paper's 1-pose "
                                 "ablation)", choices=POSE_WINDOWS, group="training", cli={"type": int})
    conditioning: str = option("clip-vae", "clip-vae (default) or clip: the paper's CLIP-only ablation (VAE path held "
                                           "at zero)", choices=CONDITIONINGS, group="training")
    dropout: float = option(0.15, "per-sample conditioning dropout, split image / pose / both (default {default:g} "
                                  "= 5/5/5 %%)", kind="unit", group="training")
    mixed_precision: str = option("no", "autocast over fp32 weights through accelerate (default: the accelerate "
                                        "launch config's, else no)", choices=MIXED_PRECISIONS, group="training",
                                  cli={"default": None})
    gradient_checkpointing: bool = option(False, "less memory, slower", group="training",
                                          cli={"action": "store_true"})
    strict: bool = option(False, "stop before the first step when a video has an unreadable frame or pose file "
                                 "(default: skip such videos and count them in the log)", group="training",
                          cli={"action": "store_true"})
    cache_conditioning: bool = option(
        False, "keep each frame's frozen encodings (CLIP tokens, VAE posteriors) and poses in memory after first "
               "use: much faster on small datasets, memory grows with the dataset", group="training",
        cli={"action": "store_true"})
    save_every: int = option(500, "checkpoint + dreampose_step_N.safetensors every N steps (default {default})",
                             minimum=1, group="saving and resuming")
    keep: int = option(2, "checkpoints kept (default {default}, the newest)", minimum=1, group="saving and resuming")
    keep_exports: int = option(0, "dreampose_step_N.safetensors files kept, the newest (0: every one; each is a "
                                  "whole model, so a long run can fill a disk)", minimum=0,
                               group="saving and resuming")
    log_every: int = option(10, "log the loss every N steps (default {default})", minimum=1,
                            group="saving and resuming")
    resume: str | None = option(None, "continue a run: 'latest' (the newest complete checkpoint under --out; a fresh "
                                      "start if none) or a checkpoint folder", group="saving and resuming",
                                cli={"metavar": "latest|PATH"})
    include_vae: bool = option(False, "put the (frozen) VAE into the saved bundles", group="weights",
                               cli={"action": "store_true"})
    cpu: bool = option(False, "train on the CPU even if a GPU is present (gloo when distributed)", group="machine",
                       cli={"action": "store_true"})
    workers: int = option(2, "threads reading frames ahead of the training loop (0: none; default {default})",
                          minimum=0, group="training")
    debug_dir: str | None = option(None, "each process writes rankR.jsonl there: its samples, loss and a parameter "
                                         "digest per step", group="machine", cli={"metavar": "DIR"})
    weight_decay: float = option(1e-2, "AdamW weight decay", flag=None)
    max_grad_norm: float = option(1.0, "gradient-norm clip (0: none)", flag=None)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def offsets(self) -> tuple[int, ...]:
        return WINDOW_OFFSETS if self.pose_window == 5 else ONE_POSE_OFFSETS

    def problems(self) -> list[str]:
        """What is wrong with the values themselves (files are checked by the trainer)."""
        c = self
        problems = []
        if not c.data:
            problems.append("no --data folder given")
        if not c.out:
            problems.append("no --out folder given")
        elif os.path.exists(c.out) and not os.path.isdir(c.out):
            problems.append(f"--out {c.out} is a file; give a folder")
        for name in ("steps", "batch_size", "micro_batch", "save_every", "keep", "log_every"):
            value = getattr(c, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a whole number ≥ 1 (got {value!r})")
        for name, high in (("batch_size", MAX_TRAIN_BATCH), ("micro_batch", MAX_TRAIN_MICRO_BATCH)):
            value = getattr(c, name)
            if isinstance(value, int) and value > high:
                problems.append(f"{name} must be at most {high} (got {value!r})")
        if not isinstance(c.keep_exports, int) or c.keep_exports < 0:
            problems.append(f"keep_exports must be a whole number ≥ 0 (got {c.keep_exports!r})")
        if not isinstance(c.workers, int) or c.workers < 0:
            problems.append(f"workers must be ≥ 0 (got {c.workers!r})")
        if not (c.lr > 0 and c.lr <= MAX_LR):
            problems.append(f"lr must be a positive number no larger than {MAX_LR:g} (got {c.lr!r})")
        if c.pose_window not in POSE_WINDOWS:
            problems.append(f"pose_window must be 5 (poses j−2..j+2) or 1 (pose j only), got {c.pose_window!r}")
        if c.conditioning not in CONDITIONINGS:
            problems.append(f"conditioning must be one of {CONDITIONINGS}, got {c.conditioning!r}")
        if not 0 <= c.dropout < 1:
            problems.append(f"dropout must be in [0, 1) (got {c.dropout!r})")
        if c.mixed_precision not in MIXED_PRECISIONS:
            problems.append(f"mixed_precision must be one of {MIXED_PRECISIONS} (got {c.mixed_precision!r})")
        if c.weight_decay < 0 or c.max_grad_norm < 0:
            problems.append("weight_decay and max_grad_norm must be ≥ 0")
        if c.height <= 0 or c.width <= 0 or c.height % SIZE_MULTIPLE or c.width % SIZE_MULTIPLE:
            problems.append(f"--width {c.width} --height {c.height}: both must be positive multiples of 64 "
                            "(DreamPose trained at 512×640)")
        elif c.height > MAX_SIZE or c.width > MAX_SIZE:
            problems.append(f"--width {c.width} --height {c.height}: both must be at most {MAX_SIZE} (DreamPose "
                            "trained at 512×640)")
        return problems


# ------------------------------------------------------------------------------ evaluation


_EVAL_SAMPLING = "sampling (identical for every row)"
_EVAL_FINETUNE = "subject finetuning on the key frame (the paper's full method does both)"


@dataclass
class EvalSettings:
    """Everything that decides the generated frames of ``eval``, identical for every row of an ablation.
    Sampling defaults are :data:`PAPER_SAMPLING`'s."""

    steps: int = option(PAPER_SAMPLING.steps, "sampler steps, at most " + str(MAX_STEPS) + " (default {default})",
                        minimum=1, maximum=MAX_STEPS, group=_EVAL_SAMPLING)
    sampler: str = option(PAPER_SAMPLING.sampler, "scheduler (default {default})", choices=SAMPLERS,
                          group=_EVAL_SAMPLING)
    s_image: float = option(PAPER_SAMPLING.s_image, "image guidance (default {default:g})", kind="finite",
                            group=_EVAL_SAMPLING)
    s_pose: float = option(PAPER_SAMPLING.s_pose, "pose guidance (default {default:g})", kind="finite",
                           group=_EVAL_SAMPLING)
    seed: int = option(PAPER_SAMPLING.seed, "seed of sampling and finetuning (default {default})", minimum=0,
                       maximum=MAX_SEED, group=_EVAL_SAMPLING)
    frames_per_batch: int = option(PAPER_SAMPLING.frames_per_batch, "frames sharing one UNet call (default "
                                   "{default})", minimum=1, group=_EVAL_SAMPLING)
    guidance_start: float = option(0.0, "guidance only from this fraction of the schedule on (default {default:g})",
                                   kind="unit", group=_EVAL_SAMPLING)
    guidance_end: float = option(1.0, "guidance only up to this fraction of the schedule (default {default:g})",
                                 kind="unit", group=_EVAL_SAMPLING)
    reference_attention: float = option(0.0, "reference attention weight (0: off; default {default:g})", kind="unit",
                                        group=_EVAL_SAMPLING)
    cross_frame_attention: float = option(0.0, "cross-frame attention weight (0: off; default {default:g})",
                                          kind="unit", group=_EVAL_SAMPLING)
    cross_frame_anchor: str = option("first", "cross-frame anchor after the first chunk (default {default})",
                                     choices=ANCHORS, group=_EVAL_SAMPLING)
    uv_smoothing: int = option(0, "temporal UV smoothing over +-N frames (0: off; default {default})", minimum=0,
                               maximum=MAX_UV_SMOOTHING, group=_EVAL_SAMPLING)
    height: int | None = option(None, "sampling height, a multiple of 64 (default: the ground truth's)",
                                group=_EVAL_SAMPLING, cli={"type": int})
    width: int | None = option(None, "sampling width, a multiple of 64 (default: the ground truth's)",
                               group=_EVAL_SAMPLING, cli={"type": int})
    key_frame: int = option(0, "index of the key frame (default {default})", minimum=0, group="videos")
    max_frames: int = option(0, "use the first N frames of each video (0 = all)", minimum=0, group="videos")
    finetune_steps: int = option(0, f"UNet + adapter finetune steps (0 = none; the authors' {FinetuneSettings.steps})",
                                 minimum=0, maximum=MAX_FINETUNE_STEPS, group=_EVAL_FINETUNE)
    vae_finetune_steps: int = option(0, "VAE decoder finetune steps (0 = none; the authors' "
                                     f"{VAE_FINETUNE_DEFAULTS['steps']})", minimum=0, maximum=MAX_FINETUNE_STEPS,
                                     group=_EVAL_FINETUNE)
    finetune_lr: float | None = option(None, "default " + f"{FinetuneSettings.lr:g}" + " (the subject finetune's)",
                                       kind="positive", group=_EVAL_FINETUNE)
    vae_finetune_lr: float | None = option(None, "default " + f"{VAE_FINETUNE_DEFAULTS['lr']:g}" + " (the VAE "
                                           "decoder finetune's)", kind="positive", group=_EVAL_FINETUNE)
    shuffle_seed: int = option(0, "seed of the shuffled-pose control (default {default})", minimum=0,
                               maximum=MAX_SEED, group="metrics")
    save_frames: bool = option(False, "also write the generated frames and a contact sheet (generated above ground "
                                      "truth)", group="output", cli={"action": "store_true"})

    def check(self) -> EvalSettings:
        """The values themselves valid (sizes: per video, by ``sampling``), or a DreamPoseError naming the first
        wrong one: before any model is loaded."""
        check_sampling_steps(self.steps)
        for name in ("finetune_steps", "vae_finetune_steps"):
            value = getattr(self, name)
            if not _whole(value, 0, MAX_FINETUNE_STEPS):
                raise DreamPoseError(f"{name} must be a whole number from 0 (none) to {MAX_FINETUNE_STEPS}, got "
                                     f"{value!r}")
        for name in ("key_frame", "max_frames"):
            if not _whole(getattr(self, name), 0, 2 ** 63 - 1):
                raise DreamPoseError(f"{name} must be a whole number ≥ 0, got {getattr(self, name)!r}")
        check_seed(self.shuffle_seed, "shuffle_seed")
        size = {"height": self.height or SIZE_MULTIPLE, "width": self.width or SIZE_MULTIPLE}
        self.sampling(**size).check()
        return self

    def sampling(self, height: int, width: int) -> SamplingOptions:
        """The sampling options of a video of this (sampling) size."""
        return SamplingOptions(width=width, height=height, steps=self.steps, sampler=self.sampler,
                               s_image=self.s_image, s_pose=self.s_pose, seed=self.seed,
                               frames_per_batch=self.frames_per_batch, guidance_start=self.guidance_start,
                               guidance_end=self.guidance_end, reference_attention=self.reference_attention,
                               cross_frame_attention=self.cross_frame_attention,
                               cross_frame_anchor=self.cross_frame_anchor, uv_smoothing=self.uv_smoothing)


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class PrepareOptions:
    """How ``prepare`` picks, sizes and poses frames. ``height``/``width``: output size (one of them
    keeps the aspect ratio; neither keeps the source size). ``every``: keep every N-th frame; ``fps``:
    keep the frames nearest to this rate instead (never more than the source has). ``max_frames``:
    at most this many output frames per video (0 = all)."""

    height: int | None = option(None, "resize frames (and poses) to this height; with only one of --height/--width "
                                      "the other keeps the aspect ratio", minimum=1, group="frames")
    width: int | None = option(None, "resize frames (and poses) to this width", minimum=1, group="frames")
    every: int = option(1, "keep every N-th frame (default {default})", minimum=1, group="frames",
                        cli={"metavar": "N"})
    fps: float | None = option(None, "keep the frames nearest to this frame rate (never more than the video has)",
                               kind="positive", group="frames")
    max_frames: int = option(0, "at most this many frames per video (0 = all)", minimum=0, group="frames")
    person: str = option("largest", "which detection becomes the pose: the largest box (default) or the best score "
                                    "(the authors')", choices=PERSON_CHOICES, group="DensePose")
    frames_per_batch: int = option(8, "frames decoded and estimated per batch (default {default})", minimum=1,
                                   group="DensePose")
    detect_resolution: int = option(DETECT_SHORT_SIDE, "shortest side the detector sees (default {default}, as "
                                                       "detectron2; 0 = frame size)", minimum=0, group="DensePose")
    overwrite: bool = option(False, "prepare finished videos again, replacing their files",
                             cli={"action": "store_true"})

    def check(self) -> PrepareOptions:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DreamPoseError(f"{name} must be a whole number of pixels ≥ 1, got {value!r}")
        if not isinstance(self.every, int) or self.every < 1:
            raise DreamPoseError(f"every must be a whole number ≥ 1, got {self.every!r}")
        if self.fps is not None:
            if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
                raise DreamPoseError(f"fps must be a positive number, got {self.fps!r}")
            if self.every != 1:
                raise DreamPoseError("give either fps or every, not both: both pick which frames are kept")
        if self.max_frames < 0:
            raise DreamPoseError(f"max_frames must be 0 (all) or more, got {self.max_frames}")
        if self.frames_per_batch < 1:
            raise DreamPoseError(f"frames_per_batch must be at least 1, got {self.frames_per_batch}")
        check_choice(self.person, PERSON_CHOICES, "person choice")
        if self.detect_resolution < 0:
            raise DreamPoseError(f"detect_resolution must be 0 (frame size) or more, got {self.detect_resolution}")
        return self


@dataclass(frozen=True)
class SynthSettings:
    """The synthetic world written by ``synth``."""

    videos: int = option(16, "number of videos (default {default})", minimum=1)
    frames: int = option(24, "frames per video (default {default})", cli={"type": int})
    height: int = option(320, "frame height in pixels, at least 32 (default {default})", cli={"type": int})
    width: int = option(256, "frame width in pixels, at least 32 (default {default})", cli={"type": int})
    seed: int = option(0, "dataset seed (default {default})", minimum=0, maximum=MAX_SEED)
    split: str = option("train", "default {default}", choices=SPLITS)
    mp4: bool = option(False, "also write each video as video.mp4 in its folder (an input for `prepare`)",
                       cli={"action": "store_true"})
    fps: float = option(8.0, "frame rate recorded (and of --mp4; default {default:g})", kind="positive")


# ------------------------------------------------------------------------------ benchmarks


@dataclass(frozen=True)
class BenchSettings:
    """``bench``: sampling against bare UNet forwards, or the finetune modes (``--finetune``)."""

    frames: int = option(8, "frames sampled (default {default})", minimum=1, maximum=MAX_BENCH_FRAMES)
    frames_per_batch: int = option(4, "frames per UNet call (default {default})", minimum=1, maximum=MAX_BENCH_FRAMES)
    steps: int = option(20, "sampler steps, at most " + str(MAX_STEPS) + " (default {default})", minimum=1,
                        maximum=MAX_STEPS)
    sampler: str = option("pndm", "default {default}", choices=SAMPLERS)
    start: str = option("official", "default {default}", choices=START_MODES)
    repeats: int = option(3, "timed sampling runs (median)", minimum=1, maximum=MAX_BENCH_REPEATS)
    forward_repeats: int = option(1, "blocks of bare UNet forwards (one chunk's worth each) timed after each "
                                     "sampling run", minimum=1, maximum=MAX_BENCH_REPEATS)
    seed: int = option(0, "seed (default {default})", minimum=0, maximum=MAX_SEED)
    finetune_steps: int = option(6, "optimizer steps per mode (default {default}; the first is set-up and not in the "
                                    "median)", minimum=2, maximum=MAX_FINETUNE_STEPS, group="finetuning (--finetune)")
    lora_rank: int = option(4, "rank for the lora mode, at most " + str(MAX_LORA_RANK) + " (default {default})",
                            minimum=1, maximum=MAX_LORA_RANK, group="finetuning (--finetune)")
    precision: str = option("fp32", "default {default}", choices=PRECISIONS, group="finetuning (--finetune)")

    def check(self) -> BenchSettings:
        """Every value in its range (the bounds of the fields), or a DreamPoseError naming the first wrong one."""
        check_sampling_steps(self.steps)
        for o in options_of(BenchSettings):
            value = getattr(self, o.name)
            if o.choices:
                check_choice(value, o.choices, o.name)
            elif o.minimum is not None:
                high = o.maximum if o.maximum is not None else 2 ** 63 - 1
                if not _whole(value, o.minimum, high):
                    raise DreamPoseError(f"bench: {o.name} must be a whole number from {o.minimum} to {high}, got "
                                         f"{value!r}")
        return self


# ------------------------------------------------------------------------------ the docs


SETTINGS_CLASSES = (SamplingOptions, FinetuneSettings, TrainConfig, EvalSettings, PrepareOptions, SynthSettings,
                    BenchSettings)


def _cell(value) -> str:
    if value is MISSING:
        return "required"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def markdown() -> str:
    """``docs/settings.md``: every option of every settings class, with its flag, default and choices."""
    lines = ["# Settings", "",
             "Generated from `dreampose/settings.py` (`python -m dreampose.settings > docs/settings.md`); the "
             "command line and the nodes read the same definitions. Presets:", "",
             "| preset | " + " | ".join(f.name for f in dataclasses.fields(SamplingOptions)) + " |",
             "|---|" + "---|" * len(dataclasses.fields(SamplingOptions))]
    for name, preset in (("`DEFAULT_SAMPLING` (animate, nodes: preset `default`)", DEFAULT_SAMPLING),
                         ("`FAST_SAMPLING` (preset `fast`)", FAST_SAMPLING),
                         ("`PAPER_SAMPLING` (preset `paper`: the authors')", PAPER_SAMPLING),
                         ("`DEMO_SAMPLING` (demo)", DEMO_SAMPLING)):
        lines.append(f"| {name} | " + " | ".join(_cell(v) for v in asdict(preset).values()) + " |")
    lines += ["", "The VAE decoder finetune changes these defaults: "
                  + ", ".join(f"`{k}` {_cell(v)}" for k, v in VAE_FINETUNE_DEFAULTS.items()) + "."]
    for cls in SETTINGS_CLASSES:
        doc = " ".join((cls.__doc__ or "").split())
        lines += ["", f"## `{cls.__name__}`", "", doc, "", "| field | flag | default | choices | meaning |",
                  "|---|---|---|---|---|"]
        for o in options_of(cls):
            choices = ", ".join(f"`{c}`" for c in o.choices) if o.choices else ""
            default = o.default
            text = o.help.replace("%%", "%")
            if "{default" in text and default is not MISSING:
                text = text.format(default=default)
            text += f" ({o.only} finetune only)" if o.only else ""
            lines.append(f"| `{o.name}` | {f'`{o.flag}`' if o.flag else '—'} | {_cell(default)} | {choices} | "
                         f"{text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
