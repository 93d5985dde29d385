"""Stage-1 training (paper §4; docs/official-code.md §5): UNet + adapter on prepared videos.

From Stable Diffusion 1.x and CLIP ViT-B/32 (a fresh DreamPose: conv_in widened with zero pose
weights, an adapter whose VAE path starts at zero) or from one of our bundles, the UNet and the
adapter learn to predict the noise of a target frame j given another frame i of the same video (the
condition, through frozen CLIP and the frozen VAE) and the poses j−2..j+2 (or j alone five times,
the paper's 1-pose ablation). Everything a sample is made of is built the way the sampler builds
it at inference, so training and sampling agree:

* the condition frame is resized to 640×512 with PIL bicubic; CLIP sees it through CLIPProcessor's
  arithmetic, the VAE in −1..1 (the ``standard`` convention); its latent is a posterior sample;
* the pose channels are ``poses.make_pose_windows`` of the window's frames (bilinear to the output
  size, (x−0.5)/0.5, nearest to latent size; the centre frame fills slots outside the video);
* conditioning dropout is per sample, [0, r/3) pose only, [r/3, 2r/3) image only, [2r/3, r) both
  (r = 0.15: 5 % / 5 % / 5 %), with the sampler's nulls: CLIP of a black frame and the VAE posterior
  of a −1 frame for the image, zeros for the pose (the rule of ``finetune.py``);
* the loss is SD's ε-MSE (v-MSE for a v-prediction schedule) at t ~ U{0..T−1}.

``conditioning="clip"`` is the paper's CLIP-only ablation: the adapter's VAE-token columns of
``linear1`` are zeroed at the start, their gradient is masked and they are re-zeroed after every
step; ``vae2clip`` is frozen; the VAE never encodes the condition, since nothing of it could reach
the UNet.

Distribution is Hugging Face ``accelerate``: one process, ``accelerate launch`` or ``torchrun`` run
the same code. The effective batch ``batch_size`` = micro-batch × accumulation × processes.

Exact resume without any data-loader state: every random number of micro-step ``m`` of optimizer
step ``s`` on rank ``r`` comes from a CPU generator seeded by (seed, s, m, r). Draw order per micro-batch:
for each sample its target frame, its condition frame, its dropout value; then the noise of the
target's posterior sample [B,4,h,w], of the condition's [B,4,80,64], of the null image's [B,4,80,64],
the timesteps [B] and ε [B,4,h,w]. A checkpoint (``accelerator.save_state``: model, optimizer,
scaler; plus ``train_state.json``) therefore continues the very same run. Frozen encodings are
computed one frame at a time, so caching them (``cache_conditioning``) changes no number.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from torch import nn

from ..data.dataset import VideoFolder, find_videos, load_frame, load_pose, screen_videos
from ..errors import DreamPoseError
from ..files.atomic import as_os_error, write_json_atomic, write_text_atomic
from ..files.destinations import check_writable, incomplete_write, write_error
from ..files.weights import is_ours, read_metadata
from ..loaders.load import load_dreampose
from ..models.adapter import hold_vae_tokens_at_zero
from ..models.bundle import save_bundle
from ..models.fingerprint import weights_digest
from ..pipeline.poses import make_pose_windows, window_indices
from ..settings import (COND_HEIGHT, COND_WIDTH, LATENT_CHANNELS, LATENT_SCALE, POSE_CHANNELS, VAE_SCALE,
                        TrainConfig)
from ..pipeline.images import condition_frame
from .run_config import check_config
from .objective import (denoising_loss, dropout_flags, frozen_condition, latent_distribution,
                        noise_scheduler, noisy_and_target, null_condition, resize)

__all__ = [
    "RESUME_KEYS",
    "Draws",
    "DreamPoseTrainable",
    "FrameIndex",
    "TrainBatch",
    "TrainData",
    "TrainResult",
    "batch_loss",
    "check_config",
    "draw_micro_batch",
    "draw_samples",
    "find_checkpoint",
    "grad_accumulation",
    "load_training_model",
    "train",
]

CHECKPOINTS = "checkpoints"
STATE_NAME = "train_state.json"
LOG_NAME = "train_log.jsonl"
FINAL_NAME = "dreampose.safetensors"
CONVENTION = "standard"
# what must match for a resumed run to be the same run (the rest, e.g. lr or steps, may change)
RESUME_KEYS = ("dataset", "videos", "frames", "batch_size", "seed", "height", "width", "pose_window",
               "conditioning", "dropout", "frozen_weights")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-step_"
# the files a run writes directly in its --out folder (besides checkpoints/)
_OUTPUT_FILE = re.compile(r"^(dreampose(_step_\d+)?\.safetensors|train_log\.jsonl)$")
_RNG_STATE = re.compile(r"^random_states_\d+\.pkl$")
_SOURCE = "dreampose train"
_COND_LATENT = (LATENT_CHANNELS, COND_HEIGHT // LATENT_SCALE, COND_WIDTH // LATENT_SCALE)

Log = Callable[[str], None]


@dataclass
class TrainResult:
    model: object              # DreamPoseModel holding the trained UNet and adapter (fp32, on the device)
    start_step: int            # optimizer steps already done when this run started (resume)
    steps: int                 # optimizer steps done in total
    final_path: str | None     # out/dreampose.safetensors (main process; None elsewhere)
    seconds: float             # wall time of the training loop of this run
    losses: list[float] = field(default_factory=list)   # mean loss over all ranks, one per step of this run
    grad_accum: int = 1
    world_size: int = 1
    is_main: bool = True


# --------------------------------------------------------------------------------------------- checks

def grad_accumulation(batch_size: int, micro_batch: int, world_size: int) -> int:
    """Accumulation steps that make ``micro_batch × steps × world_size == batch_size``."""
    per_step = micro_batch * world_size
    if batch_size % per_step:
        raise DreamPoseError(
            f"--batch-size {batch_size} is not a multiple of --micro-batch {micro_batch} × {world_size} "
            f"process(es) = {per_step}: the effective batch must split evenly, e.g. --batch-size "
            f"{max(per_step, batch_size // per_step * per_step)} or another --micro-batch")
    return batch_size // per_step


def dataset_fingerprint(videos: list[VideoFolder]) -> str:
    """Identity of the sample space: videos in order, by name and frame count (not by absolute path,
    so a dataset moved to another disk still resumes)."""
    listing = [[v.name, len(v)] for v in videos]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _run_inputs(config: TrainConfig) -> list[tuple[str, str]]:
    pairs = [("--data", d) for d in config.data or []]
    pairs += [(f"--{name}", getattr(config, name)) for name in ("init", "base", "clip", "vae")]
    return [(flag, path) for flag, path in pairs if path]


def check_outputs_are_not_inputs(config: TrainConfig) -> None:
    """Refused whatever ``--force`` says: the run writes bundles, its log and ``checkpoints/`` into
    ``--out`` (and deletes older checkpoints), so an input there would be destroyed; and data and
    outputs stay apart (``--out`` is no data folder, nor inside or above one)."""
    out = os.path.realpath(config.out)
    checkpoints = os.path.join(out, CHECKPOINTS)
    for flag, given in _run_inputs(config):
        real = os.path.realpath(given)
        if flag == "--data" or os.path.isdir(real):
            if _within(out, real):
                where = "is" if out == real else "is inside"
                raise DreamPoseError(f"--out {config.out} {where} the input {flag} {given}: training writes "
                                     "checkpoints and bundles there; give another --out folder")
            if flag == "--data" and _within(real, out):
                raise DreamPoseError(f"--out {config.out} holds the input --data {given}: keep training outputs "
                                     "and data apart; give another --out folder")
        # the file itself, and the name it is given by (a link may stand in --out), against the run's outputs
        named = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(given))), os.path.basename(given))
        for path in (real, named):
            if _within(path, checkpoints) or (os.path.dirname(path) == out
                                              and _OUTPUT_FILE.match(os.path.basename(path))):
                raise DreamPoseError(f"--out {config.out} would overwrite the input {flag} {given} (the run writes "
                                     f"{os.path.relpath(path, out)} there); give another --out folder, or move "
                                     "the input out of it")
    if config.debug_dir:
        debug = os.path.realpath(config.debug_dir)
        for flag, given in _run_inputs(config):
            if os.path.isdir(given) and _within(debug, os.path.realpath(given)):
                raise DreamPoseError(f"--debug-dir {config.debug_dir} is in the input {flag} {given}; give "
                                     "another folder")


def _read_log(path: str) -> tuple[list[tuple[int, str]], list[int]]:
    """``train_log.jsonl`` as (step, line) records and the numbers of the lines that are none (a line
    cut short by a kill, or a file that is not a training log at all)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DreamPoseError(f"cannot read {path} ({exc.strerror or exc}); move it out of --out or give "
                             "another --out folder") from None
    records, bad = [], []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append((int(record["step"]), line.decode("utf-8")))
        except (ValueError, KeyError, TypeError, IndexError, OverflowError):
            bad.append(number)
    return records, bad


def _saved_by_train(path: str) -> bool:
    try:
        meta = read_metadata(path)
    except DreamPoseError:
        return False
    return is_ours(meta) and meta.get("source") == _SOURCE


def check_existing_outputs(config: TrainConfig, resuming: bool, force: bool = False) -> None:
    """Files in ``--out`` the run would replace but did not write are refused unless ``force``. A log
    with records is a training log (its other lines are dropped later, and said; with no checkpoint it
    is an attempt that saved none, e.g. on a full disk, so its rerun may go on); a log without any is
    not. Bundles are the run's own only when it resumes and ``dreampose train`` saved them."""
    if not os.path.isdir(config.out):
        return
    folder = os.path.join(config.out, CHECKPOINTS)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DreamPoseError(f"--out {config.out}: {folder} is a file, not the run's checkpoint folder; move it or "
                             "give another --out folder")
    foreign = []
    for name in sorted(os.listdir(config.out)):
        if not _OUTPUT_FILE.match(name):
            continue
        path = os.path.join(config.out, name)
        if os.path.isdir(path):
            raise DreamPoseError(f"--out {config.out}: {name} is a folder where the run writes a file; move it or "
                                 "give another --out folder")
        if force:
            continue
        if name == LOG_NAME:
            records, bad = _read_log(path)
            if bad and not records:
                foreign.append(f"{name} (no line of it is a training-log record)")
        elif not resuming:
            foreign.append(f"{name} (of another run: no checkpoint here to resume)")
        elif not _saved_by_train(path):
            foreign.append(f"{name} (not saved by dreampose train)")
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise DreamPoseError(f"--out {config.out} already holds {', '.join(foreign[:3])}{more}, which this run did "
                             f"not write; pass --force to replace {'it' if len(foreign) == 1 else 'them'}, or give "
                             "another --out folder")


# --------------------------------------------------------------------------------------------- weights

def load_training_model(config: TrainConfig, log: Log | None = None):
    """The DreamPose to train, from ``base`` (fresh) or ``init`` (our bundle), with ``clip``/``vae``.

    All weight loading lives here: UNet and adapter become fp32 masters, VAE and CLIP stay frozen.
    """
    model = load_dreampose(clip=config.clip, dreampose=config.init, base=config.base, vae=config.vae,
                           convention=CONVENTION if not config.init else None)
    if model.convention != CONVENTION and log is not None:
        log(f"note: {config.init} uses the {model.convention!r} conditioning convention; training continues it "
            f"in {CONVENTION!r} (VAE condition in −1..1), and the saved bundles say so")
    model.convention = CONVENTION
    model.to("cpu", torch.float32, torch.float32, torch.float32)
    model.vae.eval().requires_grad_(False)
    model.clip.eval().requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------- sampling

class FrameIndex:
    """Global frame number ↔ (video, frame); every frame of every video is a target equally often."""

    def __init__(self, counts: list[int]):
        if not counts or min(counts) < 1:
            raise DreamPoseError("every video needs at least one frame")
        self.counts = list(counts)
        self.starts = [0]
        for n in self.counts:
            self.starts.append(self.starts[-1] + n)

    @property
    def total(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        lo, hi = 0, len(self.counts) - 1
        while lo < hi:   # last start ≤ index
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo, index - self.starts[lo]


def _seed_of(*key: int) -> int:
    digest = hashlib.sha256(("dreampose-train:" + ":".join(str(int(k)) for k in key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch of one rank (``step`` counts completed optimizer steps)."""
    return torch.Generator().manual_seed(_seed_of(seed, step, micro, rank))


@dataclass
class Draws:
    """Every random number of one micro-batch (all CPU)."""

    samples: list[tuple[int, int, int]]   # (video, target frame j, condition frame i)
    drop_image: torch.Tensor              # [B] bool
    drop_pose: torch.Tensor               # [B] bool
    target_noise: torch.Tensor | None = None   # [B,4,h,w]  posterior sample of the target latent
    cond_noise: torch.Tensor | None = None     # [B,4,80,64] posterior sample of the condition latent
    null_noise: torch.Tensor | None = None     # [B,4,80,64] posterior sample of the null image latent
    timesteps: torch.Tensor | None = None      # [B] long
    noise: torch.Tensor | None = None          # [B,4,h,w] ε


def draw_samples(frames: FrameIndex, generator: torch.Generator, count: int, dropout: float) -> Draws:
    """Targets uniform over all frames; the condition uniform over the video's other frames (the
    target itself for a one-frame video); per-sample dropout."""
    samples, drop_i, drop_p = [], [], []
    for _ in range(count):
        v, j = frames.locate(int(torch.randint(frames.total, (1,), generator=generator)))
        n = frames.counts[v]
        k = int(torch.randint(max(n - 1, 1), (1,), generator=generator))
        i = j if n == 1 else (k if k < j else k + 1)
        u = torch.rand(1, generator=generator, dtype=torch.float64).item()
        image, pose = dropout_flags(u, dropout)
        samples.append((v, j, i))
        drop_i.append(image)
        drop_p.append(pose)
    return Draws(samples, torch.tensor(drop_i, dtype=torch.bool), torch.tensor(drop_p, dtype=torch.bool))


def draw_micro_batch(frames: FrameIndex, config: TrainConfig, step: int, micro: int, rank: int,
                     num_train_timesteps: int = 1000) -> Draws:
    """All draws of micro-batch ``micro`` of optimizer step ``step`` on ``rank``, in the documented order."""
    g = step_generator(config.seed, step, micro, rank)
    d = draw_samples(frames, g, config.micro_batch, config.dropout)
    b = config.micro_batch
    latent = (b, 4, config.height // LATENT_SCALE, config.width // LATENT_SCALE)
    d.target_noise = torch.randn(latent, generator=g)
    d.cond_noise = torch.randn((b, *_COND_LATENT), generator=g)
    d.null_noise = torch.randn((b, *_COND_LATENT), generator=g)
    d.timesteps = torch.randint(0, num_train_timesteps, (b,), generator=g)
    d.noise = torch.randn(latent, generator=g)
    return d


# --------------------------------------------------------------------------------------------- data

@dataclass
class _Files:
    """Frames and poses read from disk for one micro-batch (only what is not cached)."""

    targets: dict = field(default_factory=dict)   # (v, j) → [1,3,H,W] −1..1
    conds: dict = field(default_factory=dict)     # (v, i) → [1,3,640,512] uint8
    poses: dict = field(default_factory=dict)     # (v, k) → [2,h,w] normalised, latent size


@dataclass
class TrainBatch:
    """One micro-batch ready for the UNet (on the training device)."""

    z0: torch.Tensor            # [B,4,h,w] target latent (scaled)
    pose: torch.Tensor          # [B,10,h,w] pose channels, zeros where the pose is dropped
    clip_tokens: torch.Tensor   # [B,T,D] CLIP tokens of the condition, of the black frame where dropped
    cond_latent: torch.Tensor   # [B,4,80,64] condition latent (scaled), the null latent where dropped
    timesteps: torch.Tensor     # [B]
    noise: torch.Tensor         # [B,4,h,w]
    samples: list[tuple[int, int, int]]
    drop_image: torch.Tensor
    drop_pose: torch.Tensor


class TrainData:
    """Prepared videos plus the frozen encoders: turns draws into batches.

    Every frozen encoding is computed one frame at a time (so a frame's numbers never depend on
    what else is in its batch) and, with ``cache``, kept in CPU memory after its first use.
    """

    def __init__(self, videos: list[VideoFolder], vae, clip, config: TrainConfig, device, cache: bool = False):
        self.videos, self.vae, self.clip, self.config = videos, vae, clip, config
        self.device, self.cache = torch.device(device), cache
        self.frames = FrameIndex([len(v) for v in videos])
        self.windows = [window_indices(len(v), config.offsets) for v in videos]
        self.use_vae_condition = config.conditioning == "clip-vae"
        self._targets: dict = {}   # (v, j) → (mean, std) [4,h,w]
        self._conds: dict = {}     # (v, i) → (clip [T,D], mean [4,80,64], std)
        self._poses: dict = {}     # (v, k) → [2,h,w]
        tokens, mean, std = null_condition(clip, vae, CONVENTION, "cpu", use_vae=self.use_vae_condition)
        self.null_clip = tokens[0]
        if self.use_vae_condition:
            self.null_mean, self.null_std = mean[0], std[0]
        else:
            self.null_mean = self.null_std = torch.zeros(_COND_LATENT)

    # ---- reading (thread-safe: pure functions of the draws and the files)
    def _window(self, v: int, j: int) -> list[int]:
        return self.windows[v][j].tolist()

    def read(self, draws: Draws) -> _Files:
        """Everything of ``draws`` that has to come from disk (skipping what is cached)."""
        c, files = self.config, _Files()
        for b, (v, j, i) in enumerate(draws.samples):
            video = self.videos[v]
            if (v, j) not in self._targets and (v, j) not in files.targets:
                x = load_frame(video.frames[j]).float() / 255
                files.targets[(v, j)] = (resize(x, c.height, c.width, antialias=True) * 2 - 1).unsqueeze(0)
            if not draws.drop_image[b] and (v, i) not in self._conds and (v, i) not in files.conds:
                files.conds[(v, i)] = condition_frame(load_frame(video.frames[i]))
            for k in ([] if draws.drop_pose[b] else self._window(v, j)):
                if (v, k) not in self._poses and (v, k) not in files.poses:
                    files.poses[(v, k)] = make_pose_windows(load_pose(video.poses[k]), c.height, c.width).uv[0]
        return files

    # ---- frozen encoders (one frame at a time)
    def _target_dist(self, key, files: _Files):
        if key in self._targets:
            return self._targets[key]
        mean, std = latent_distribution(self.vae, files.targets[key], "cpu")
        out = (mean[0], std[0])
        if self.cache:
            self._targets[key] = out
        return out

    def _cond_encoding(self, key, files: _Files):
        if key in self._conds:
            return self._conds[key]
        tokens, mean, std = frozen_condition(self.clip, self.vae, files.conds[key], CONVENTION, "cpu",
                                             use_vae=self.use_vae_condition)
        if self.use_vae_condition:
            mean, std = mean[0], std[0]
        else:   # the VAE path is held at zero: nothing of the condition latent can reach the UNet
            mean = std = torch.zeros(_COND_LATENT)
        out = (tokens[0], mean, std)
        if self.cache:
            self._conds[key] = out
        return out

    def _pose_map(self, key, files: _Files) -> torch.Tensor:
        if key in self._poses:
            return self._poses[key]
        out = files.poses[key]
        if self.cache:
            self._poses[key] = out
        return out

    def pose_channels(self, v: int, j: int, files: _Files) -> torch.Tensor:
        """``[10,h,w]``: the window's normalised pose maps, as ``make_pose_windows(...).windows([j])``."""
        return torch.cat([self._pose_map((v, k), files) for k in self._window(v, j)])

    @torch.no_grad()
    def batch(self, draws: Draws, files: _Files | None = None) -> TrainBatch:
        """Draws (+ what was read for them) → a batch on the training device."""
        files = files if files is not None else self.read(draws)
        z0, pose, tokens, cond = [], [], [], []
        for b, (v, j, i) in enumerate(draws.samples):
            t_mean, t_std = self._target_dist((v, j), files)
            z0.append((t_mean + t_std * draws.target_noise[b]) * VAE_SCALE)
            if draws.drop_image[b]:
                tokens.append(self.null_clip)
                cond.append((self.null_mean + self.null_std * draws.null_noise[b]) * VAE_SCALE)
            else:
                c_tokens, c_mean, c_std = self._cond_encoding((v, i), files)
                tokens.append(c_tokens)
                cond.append((c_mean + c_std * draws.cond_noise[b]) * VAE_SCALE)
            if draws.drop_pose[b]:   # the sampler's null pose: zeros after normalisation
                pose.append(torch.zeros(POSE_CHANNELS, *draws.noise.shape[-2:]))
            else:
                pose.append(self.pose_channels(v, j, files))
        dev = self.device
        return TrainBatch(torch.stack(z0).to(dev), torch.stack(pose).to(dev), torch.stack(tokens).to(dev),
                          torch.stack(cond).to(dev), draws.timesteps.to(dev), draws.noise.to(dev),
                          list(draws.samples), draws.drop_image, draws.drop_pose)


# --------------------------------------------------------------------------------------------- model

class DreamPoseTrainable(nn.Module):
    """UNet + adapter as one module, so DDP sees (and synchronises) both through one forward."""

    def __init__(self, unet, adapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, noisy: torch.Tensor, pose: torch.Tensor, timesteps: torch.Tensor, clip_tokens: torch.Tensor,
                cond_latent: torch.Tensor) -> torch.Tensor:
        hidden = self.adapter(clip_tokens, cond_latent)
        return self.unet(torch.cat([noisy, pose], dim=1), timesteps, encoder_hidden_states=hidden).sample


def batch_loss(model: nn.Module, batch: TrainBatch, scheduler) -> torch.Tensor:
    """ε-MSE (v-MSE for v-prediction) of one batch, mean over all elements, in fp32."""
    noisy, target = noisy_and_target(scheduler, batch.z0, batch.noise, batch.timesteps)
    pred = model(noisy, batch.pose, batch.timesteps, batch.clip_tokens, batch.cond_latent)
    return denoising_loss(pred, target)


def _rezero_vae_tokens(adapter) -> None:
    """After a step: the VAE-token weights are exactly zero again (they already are: their gradient is
    masked; this keeps the guarantee independent of the optimizer's arithmetic)."""
    with torch.no_grad():
        adapter.linear1.weight[:, adapter.clip_tokens:] = 0


def params_digest(module: nn.Module) -> str:
    """sha256 of every parameter's bytes, in name order (debug: ranks must agree after each step)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        t = p.detach().float().cpu().contiguous()
        h.update(name.encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- checkpoints

_STEP_EXPORT = re.compile(r"^dreampose_step_(\d+)\.safetensors$")


def _step_exports(out: str) -> list[str]:
    """The ``dreampose_step_N.safetensors`` files in ``out``, oldest step first."""
    found = [(int(m.group(1)), os.path.join(out, name)) for name in os.listdir(out)
             if (m := _STEP_EXPORT.match(name))]
    return [path for _, path in sorted(found)]


def _complete_checkpoints(out: str) -> list[tuple[int, str]]:
    folder = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _STEP_DIR.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isfile(os.path.join(path, STATE_NAME)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_checkpoint(out: str, resume: str) -> str | None:
    """``latest`` → the newest complete checkpoint under ``out`` (None if there is none); a path → itself."""
    if resume == "latest":
        found = _complete_checkpoints(out)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_NAME)):
        raise DreamPoseError(f"--resume {resume}: not a complete training checkpoint (no {STATE_NAME}); give a "
                             f"folder like {os.path.join(out, CHECKPOINTS, 'step_N')} or 'latest'")
    return resume


def resume_candidates(out: str, resume: str) -> list[str]:
    """The checkpoints to try, in order: ``latest`` → every complete one, newest first (an older one is
    the fallback when a newer one does not load); a path → that one."""
    if resume == "latest":
        return [path for _, path in reversed(_complete_checkpoints(out))]
    return [find_checkpoint(out, resume)]


# what goes wrong when a checkpoint's files are truncated, damaged or refused (a pickle that is not
# weights-only), as torch, safetensors and accelerate report it
_BAD_CHECKPOINT = (RuntimeError, KeyError, ValueError, EOFError, OSError, pickle.UnpicklingError, SafetensorError,
                   zipfile.BadZipFile)


def _first_readable_state(candidates: list[str]) -> tuple[str | None, dict | None]:
    """The first candidate whose state file reads (checked before any weights are loaded)."""
    first_error = None
    for path in candidates:
        try:
            return path, read_checkpoint_state(path)
        except DreamPoseError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return None, None


def _load_first_good(accelerator, candidates: list[str], identity: dict, info: Log) -> tuple[str, dict]:
    """Load the first checkpoint of ``candidates`` that loads completely; say which ones did not and why."""
    failures = []
    for path in candidates:
        try:
            saved = read_checkpoint_state(path)
            _compare_resume(saved["config"], identity, path)
            _check_random_states(path)
            accelerator.load_state(path)
        except DreamPoseError as exc:
            failures.append((path, str(exc)))
        except _BAD_CHECKPOINT as exc:
            failures.append((path, f"{type(exc).__name__}: {str(exc)[:200]}"))
        else:
            for bad, why in failures:
                info(f"warning: checkpoint {bad} does not load ({why}); resuming from the previous one, {path}")
            return path, saved
    bad, why = failures[0]
    more = f" (and {len(failures) - 1} older one(s))" if len(failures) > 1 else ""
    raise DreamPoseError(f"no checkpoint loads: {bad}{more}: {why}. Start a new run in another --out folder, or "
                         "remove the damaged checkpoints")


def _apply_new_hyperparameters(optimizer, config, saved: dict, info: Log) -> None:
    """A resumed run trains with this run's learning rate and weight decay (a checkpoint restores its own
    into the optimizer); a change is said, never silently undone."""
    before = dict(saved.get("training") or {})
    for key, value in (("lr", config.lr), ("weight_decay", config.weight_decay)):
        old = {group[key] for group in optimizer.param_groups}
        for group in optimizer.param_groups:
            group[key] = value
        if old != {value}:
            info(f"resume: {key} {', '.join(f'{v:g}' for v in sorted(old))} in the checkpoint, now {value:g} "
                 f"(applied from step {int(saved['step']) + 1})")
        elif before.get(key) not in (None, value):
            info(f"resume: {key} now {value:g}")


def read_checkpoint_state(path: str) -> dict:
    try:
        with open(os.path.join(path, STATE_NAME)) as f:
            state = json.load(f)
        int(state["step"])
        dict(state["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DreamPoseError(f"{path}: damaged {STATE_NAME} ({exc}); resume from another checkpoint") from exc
    return state


def _compare_resume(saved: dict, current: dict, path: str, keys=RESUME_KEYS) -> None:
    differ = [k for k in keys if k in current and saved.get(k) != current[k]]
    if differ:
        lines = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differ)
        raise DreamPoseError(f"cannot resume from {path}: this run differs in {', '.join(differ)} ({lines}). "
                             "Resume with the checkpoint's settings, or start a new run in another --out folder")


# --------------------------------------------------------------------------------------------- the run

class _Reader:
    """Reads the frames of upcoming micro-batches in worker threads (results are pure functions of the
    draws, so reading ahead changes no number)."""

    def __init__(self, data: TrainData, make_draws, workers: int):
        self.data, self.make_draws = data, make_draws
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dreampose-read") if workers else None
        self.pending: dict = {}

    def _job(self, key):
        draws = self.make_draws(*key)
        return draws, self.data.read(draws)

    def ahead(self, keys) -> None:
        if self.pool is None:
            return
        for key in keys:
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self._job, key)

    def get(self, key):
        future = self.pending.pop(key, None)
        return future.result() if future is not None else self._job(key)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _upcoming(step: int, micro: int, accum: int, steps: int, count: int):
    keys = []
    while len(keys) < count:
        micro += 1
        if micro == accum:
            step, micro = step + 1, 0
        if step >= steps:
            break
        keys.append((step, micro))
    return keys


def _bundle_meta(config: TrainConfig, model, step: int, world: int, accum: int) -> dict:
    training = dict(config.to_dict(), world_size=world, grad_accum=accum, step=step)
    return {"convention": CONVENTION, "scheduler_config": model.scheduler_config,
            "pose_window": str(config.pose_window), "conditioning": config.conditioning,
            "resolution": f"{config.width}x{config.height}", "height": str(config.height),
            "width": str(config.width), "step": str(step), "trained": "stage1", "training": training,
            "base_model": os.path.basename(config.init or config.base or ""), "source": _SOURCE}


def _append_jsonl(path: str, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise write_error(path, exc) from None


def _make_folder(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc) from None


def _put_in_place(tmp: str, final: str) -> None:
    """Rename a complete checkpoint folder to its final name; one already there (a fallback resume saving
    that step again) is replaced, and put back if the rename fails."""
    old = final + ".old"
    try:
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        if os.path.isdir(old) and not os.path.exists(final):
            os.replace(old, final)
        raise write_error(final, exc) from None
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_error(path: str, exc: BaseException) -> DreamPoseError:
    """A failed checkpoint write as one clear line: safetensors says ``os error N``, torch.save only
    that the write failed (then the free space and ``ulimit -f`` are measured for the message)."""
    if not isinstance(exc, OSError):
        exc = as_os_error(exc) if "os error " in str(exc) else exc
    if isinstance(exc, OSError) and exc.errno is not None:
        return write_error(path, exc)
    text = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", str(exc).strip()).splitlines()
    why = text[0][:120] if text else type(exc).__name__
    return incomplete_write(path, f"saving the checkpoint stopped short ({why})")


def _check_random_states(path: str) -> None:
    """accelerate loads the RNG state files itself and silently goes on with fresh RNG state when one
    is refused (a pickle that is not weights-only) or damaged; checked here first, such a checkpoint is
    reported and skipped like any other refused file. Every rank checks every file, so all agree."""
    from accelerate.utils import load

    for name in sorted(n for n in os.listdir(path) if _RNG_STATE.match(n)):
        try:
            states = load(os.path.join(path, name))
            if not isinstance(states, dict) or not {"random_state", "torch_manual_seed"} <= states.keys():
                raise ValueError("not accelerate's random states")
        except (*_BAD_CHECKPOINT, TypeError, AttributeError) as exc:
            code = re.search(r"GLOBAL (\S+)", str(exc))   # torch's weights-only unpickler names what it refused
            why = (f"refused: it names {code.group(1)} (code, not data), so it was not unpickled" if code
                   else f"damaged ({type(exc).__name__}), not an RNG state file accelerate wrote")
            raise DreamPoseError(f"{name} is {why}; deleting it lets that checkpoint resume with fresh RNG "
                                 "state") from None


def _trim_log(path: str, step: int, info: Log) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resumed run continues from) and lines
    that are no log record (cut short by a kill, or garbage): the valid records are kept, and it is said."""
    if not os.path.isfile(path):
        return
    records, bad = _read_log(path)
    kept = [line for s, line in records if s <= step]
    if bad:
        lines = ", ".join(map(str, bad[:5])) + (" …" if len(bad) > 5 else "")
        info(f"warning: {path}: dropped {len(bad)} line(s) that are no log record (line {lines}); kept "
             f"{len(kept)} record(s) up to step {step}")
    if step == 0 and records:
        info(f"note: {path}: {len(records)} record(s) of an earlier attempt that saved no checkpoint dropped; "
             "the log starts anew")
    if bad or len(kept) < len(records):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def train(config: TrainConfig, *, log: Log | None = None, progress: bool | Callable[[dict, int], None] = True,
          force: bool = False) -> TrainResult:
    """Run (or continue) stage-1 training; see the module docstring.

    Saves under ``config.out``: ``checkpoints/step_N/`` (the last ``keep``), ``dreampose_step_N.safetensors``
    at every save (the last ``keep_exports``; 0: all), ``dreampose.safetensors`` at the end, ``train_log.jsonl``.

    Args:
        config: the run (:class:`~dreampose.settings.TrainConfig`). ``config.resume`` continues a saved run,
            which must be the same run (``RESUME_KEYS``); without it, an ``out`` folder that already holds
            checkpoints is refused.
        log: where messages go, on the main process only (default: ``print``).
        progress: True logs a line per logged step through ``log``; a callable ``progress(record, total_steps)``
            gets each ``train_log.jsonl`` record instead (the command line drives a bar with it); False: neither.
        force: replace files in ``out`` that this run did not write (``--force``); an input there is refused
            even so.

    Returns:
        A :class:`TrainResult`: the model holding the trained UNet and adapter, the step counts, the final
        file's path (main process only), this run's losses and time.
    """
    from accelerate import PartialState

    config = check_config(config)
    check_outputs_are_not_inputs(config)
    check_writable(os.path.join(config.out, LOG_NAME), "--out")
    say = log or (lambda msg: print(msg, flush=True))
    state = PartialState(cpu=config.cpu)
    try:
        return _run(config, state, say, progress, force)
    finally:
        if not state.use_distributed:
            # accelerate keeps its settings process-wide and refuses different ones later; a
            # single-process run gives them back, so a library caller can train again (other precision)
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _run(config: TrainConfig, state, say: Log, progress, force: bool = False) -> TrainResult:
    from accelerate import Accelerator

    main, rank, world = state.is_main_process, state.process_index, state.num_processes

    def info(msg: str) -> None:
        if main:
            say(msg)

    # 1. everything checkable without weights
    accum = grad_accumulation(config.batch_size, config.micro_batch, world)
    videos = screen_videos(find_videos(config.data, warn=info), strict=config.strict, warn=info)
    frames_total = sum(len(v) for v in videos)
    identity = {"dataset": dataset_fingerprint(videos), "videos": len(videos), "frames": frames_total,
                **{k: getattr(config, k) for k in ("batch_size", "seed", "height", "width", "pose_window",
                                                   "conditioning", "dropout")}}
    candidates = resume_candidates(config.out, config.resume) if config.resume else []
    resume_path, saved = _first_readable_state(candidates)
    if saved:
        _compare_resume(saved["config"], identity, resume_path)
    elif config.resume == "latest":
        info(f"--resume latest: no checkpoint in {os.path.join(config.out, CHECKPOINTS)} yet; starting at step 0")
    elif _complete_checkpoints(config.out):
        newest = _complete_checkpoints(config.out)[-1][1]
        raise DreamPoseError(f"{config.out} already holds checkpoints of a run (newest {newest}): continue it with "
                             "--resume latest, or start a new run in another --out folder")
    check_existing_outputs(config, resuming=bool(saved), force=force)

    # 2. weights and the accelerator
    try:
        accelerator = Accelerator(gradient_accumulation_steps=accum, mixed_precision=config.mixed_precision,
                                  cpu=config.cpu)
    except (ValueError, RuntimeError) as exc:
        raise DreamPoseError(f"--mixed-precision {config.mixed_precision} is not available here ({exc}); "
                             "use --mixed-precision no (or bf16 on a CPU)") from exc
    device = accelerator.device
    info(f"{len(videos)} video(s), {frames_total} frame(s); {world} process(es) × micro-batch {config.micro_batch} "
         f"× {accum} accumulation = batch {config.batch_size}; {config.width}x{config.height} (WxH), pose window "
         f"{config.pose_window}, conditioning {config.conditioning}, "
         f"{'fp32' if config.mixed_precision == 'no' else config.mixed_precision} on {device}")
    model = load_training_model(config, info)
    identity["frozen_weights"] = weights_digest(model.vae, model.clip)
    if saved:
        _compare_resume(saved["config"], identity, resume_path, ("frozen_weights",))
    torch.nn.Module.to(model.vae, device)
    torch.nn.Module.to(model.clip, device)
    unet, adapter = model.unet, model.adapter
    unet.train().requires_grad_(True)
    adapter.train().requires_grad_(True)
    clip_only = config.conditioning == "clip"
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = DreamPoseTrainable(unet, adapter).to(device)
    if clip_only:   # on the device already: the gradient mask lives beside the weight
        hold_vae_tokens_at_zero(adapter)
        adapter.vae2clip.requires_grad_(False)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                                  eps=1e-8)
    trainable, optimizer = accelerator.prepare(trainable, optimizer)
    start = 0
    if saved:
        resume_path, saved = _load_first_good(accelerator, candidates, identity, info)
        accelerator.step = 0   # accumulation counter: every optimizer step starts a fresh cycle
        start = int(saved["step"])
        _apply_new_hyperparameters(optimizer, config, saved, info)
        if (saved.get("world_size"), saved.get("micro_batch")) != (world, config.micro_batch):
            info(f"note: the checkpoint ran {saved.get('world_size')} process(es) × micro-batch "
                 f"{saved.get('micro_batch')}; now {world} × {config.micro_batch}: same effective batch, but the "
                 "samples drawn from here on differ from an uninterrupted run")
        info(f"resumed from {resume_path} at step {start}")
    scheduler = noise_scheduler(model)
    data = TrainData(videos, model.vae, model.clip, config, device, cache=config.cache_conditioning)
    cfg_t = scheduler.config.num_train_timesteps

    def make_draws(step: int, micro: int) -> Draws:
        return draw_micro_batch(data.frames, config, step, micro, rank, cfg_t)

    # 3. output
    log_path = os.path.join(config.out, LOG_NAME)
    if main:
        folder = os.path.join(config.out, CHECKPOINTS)
        _make_folder(folder)
        for name in os.listdir(folder):   # half-written checkpoints of an interrupted save
            if name.startswith(_TMP_PREFIX) or name.endswith(".old"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        _trim_log(log_path, start, info)
    debug_path = None
    if config.debug_dir:
        _make_folder(config.debug_dir)
        debug_path = os.path.join(config.debug_dir, f"rank{rank}.jsonl")
    accelerator.wait_for_everyone()

    def save(step: int) -> None:
        folder = os.path.join(config.out, CHECKPOINTS)
        tmp, final = os.path.join(folder, f"{_TMP_PREFIX}{step}"), os.path.join(folder, f"step_{step}")
        if main and os.path.exists(tmp):
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        try:   # accelerate writes its files itself: a full disk or `ulimit -f` surfaces here, in three forms
            accelerator.save_state(tmp)
        except (OSError, SafetensorError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _checkpoint_error(final, exc) from None
        accelerator.wait_for_everyone()
        if main:
            try:
                write_json_atomic(os.path.join(tmp, STATE_NAME),
                                  {"format": "dreampose-train", "version": 1, "step": step, "config": identity,
                                   "world_size": world, "micro_batch": config.micro_batch, "grad_accum": accum,
                                   "training": config.to_dict()}, indent=1, default=str)
                _put_in_place(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)   # gone already when it went into place
            export(os.path.join(config.out, f"dreampose_step_{step}.safetensors"), step)
            for _, path in _complete_checkpoints(config.out)[:-config.keep]:
                shutil.rmtree(path, ignore_errors=True)
            if config.keep_exports:
                for path in _step_exports(config.out)[:-config.keep_exports]:
                    os.remove(path)
        accelerator.wait_for_everyone()

    def export(path: str, step: int) -> str:
        inner = accelerator.unwrap_model(trainable)
        return save_bundle(path, inner.unet, inner.adapter, model.vae if config.include_vae else None,
                           **_bundle_meta(config, model, step, world, accum))

    # 4. the loop
    reader = _Reader(data, make_draws, config.workers)
    losses: list[float] = []
    window: list[float] = []
    t_start = t_window = time.perf_counter()
    lookahead = max(2, config.workers * 2)
    try:
        for step in range(start, config.steps):
            step_losses, step_samples = [], []
            for micro in range(accum):
                reader.ahead(_upcoming(step, micro, accum, config.steps, lookahead))
                draws, files = reader.get((step, micro))
                with accelerator.accumulate(trainable):
                    batch = data.batch(draws, files)
                    loss = batch_loss(trainable, batch, scheduler)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_losses.append(loss.detach().float())
                step_samples.append([[v, j, i, int(di), int(dp)] for (v, j, i), di, dp in
                                     zip(draws.samples, draws.drop_image.tolist(), draws.drop_pose.tolist())])
            if clip_only:
                _rezero_vae_tokens(adapter)
            done = step + 1
            local_t = torch.stack(step_losses).mean()   # one device sync per step, not per micro-step
            mean = float(accelerator.reduce(local_t.reshape(1), reduction="mean")[0])
            local = float(local_t)
            if not math.isfinite(mean):
                raise DreamPoseError(f"training diverged at step {done} (loss {mean}); lower --lr or use "
                                     "--mixed-precision no")
            losses.append(mean)
            window.append(mean)
            if debug_path:
                _append_jsonl(debug_path, {"step": done, "rank": rank, "world_size": world, "grad_accum": accum,
                                         "loss": local, "samples": step_samples,
                                         "digest": params_digest(accelerator.unwrap_model(trainable))})
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                if main:
                    lr = optimizer.param_groups[0]["lr"]
                    record = {"step": done, "loss": sum(window) / len(window), "lr": lr,
                              "seconds": round(now - t_start, 3),
                              "s_per_step": round((now - t_window) / len(window), 4)}
                    _append_jsonl(log_path, record)
                    if callable(progress):
                        progress(record, config.steps)
                    elif progress:
                        say(f"train: step {done}/{config.steps}  loss {record['loss']:.4f}  lr {lr:g}  "
                            f"{record['s_per_step']:.3f} s/step")
                window, t_window = [], now
            if done % config.save_every == 0 or done == config.steps:
                t_save = time.perf_counter()
                save(done)
                t_window += time.perf_counter() - t_save   # s/step measures training, not saving
    finally:
        reader.close()
    seconds = time.perf_counter() - t_start
    final_path = None
    if main:
        final_path = export(os.path.join(config.out, FINAL_NAME), max(start, config.steps))
    accelerator.wait_for_everyone()
    inner = accelerator.unwrap_model(trainable)
    if config.gradient_checkpointing:
        inner.unet.disable_gradient_checkpointing()
    inner.eval().requires_grad_(False)
    result_model = model.shallow_copy(unet=inner.unet, adapter=inner.adapter,
                                      info=dict(model.info, trained="stage1", steps=max(start, config.steps)))
    return TrainResult(result_model, start, max(start, config.steps), final_path, seconds, losses, accum, world, main)
