"""Subject finetuning, the paper's second stage (§4.3): UNet + adapter, then the VAE decoder.

``finetune_subject`` teaches the UNet and the adapter one person from a few photos, each with its
own DensePose: the loss is the ε-prediction MSE of Stable Diffusion, on the VAE latent of the photo
noised to a random DDPM timestep of the SD 1.x schedule, with the pose concatenated to the noisy
latent (the same pose five times, as the authors' finetune dataset stacked it: a single photo has no
neighbouring frames) and the cross-attention states computed from the photo itself through CLIP,
the VAE and the adapter in the model's conditioning convention. ``finetune_vae_decoder`` then trains
the decoder alone to reconstruct the photos.

Where this differs from the authors' scripts on purpose (official-code-notes.md §6 and §8):

* The loss target is the *augmented* photo and the pose gets the same crop (quirk #19: their target
  was the un-cropped photo while the pose was cropped). See :mod:`dreampose.augment`.
* CLIP sees the real uint8 photo with CLIPProcessor's arithmetic (quirk #7: their [0,1] tensors
  were rescaled twice and CLIP saw an almost black image).
* The conditioning image (un-augmented, as at inference) is encoded once: CLIP tokens and the VAE
  latent distribution are computed once per photo, and the VAE latent is re-sampled every step from
  that distribution, as their per-step ``latent_dist.sample()`` did.
* Targets are in −1..1, the range ``decode_latents`` maps back to 0..1. The authors trained on 0..1
  photos (the washed-out outputs of their issues #25/#33, hidden by a per-frame stretch); the VAE
  decoder finetune offers their range as ``decoder_range="0_1"`` for parity only.
* Conditioning dropout, off by default as in their finetune (``dropout_rate=0``), is per sample when
  enabled (quirk #20), split equally into pose / image / both, with the sampler's nulls (zero pose
  after normalisation, the convention's null image).
* Every random draw comes from one CPU generator seeded by ``settings.seed`` (LoRA's initial
  factors from the global RNG, forked and seeded with it), so a seed gives the same weights on
  every run on the same device; the final weights are returned whatever the step count (quirk #21); ``module.`` prefixes
  never arise (quirk #17).
* Optimizer as theirs (AdamW β 0.9/0.999, ε 1e-8, weight decay 1e-2, constant lr, gradient-norm clip
  1.0), except that the clip covers every trained parameter (theirs: the UNet's only).

Per step, the draws are: (a permutation when a pass over the photos starts) then for each sample the
augmentation (5 values) and the dropout value; then the noise of the target latent sample, of the
conditioning latent sample, (of the null image's latent, when a sample drops the image), the
timesteps and the ε noise.

Training happens on a copy: the input model is never changed. The UNet and adapter are copied as
fp32 master weights on the training device (``precision`` bf16/fp16 autocasts the forward; fp16 uses
a gradient scaler), the frozen VAE and CLIP are used where and as they are. The returned model holds
the finetuned networks in the dtype and on the device of the ones they replace, and shares the rest
with the input. ComfyUI runs nodes under ``torch.inference_mode()``; finetuning leaves it explicitly
and clones what it needs, so calling it from a node is safe.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .augment import augment_pair
from ..files.weights import read_metadata
from ..pipeline.conditioning import COND_HEIGHT, COND_WIDTH, VAE_SCALE, vae_inputs
from ..models.adapter import hold_vae_tokens_at_zero
from ..errors import DreamPoseError
from ..pipeline.images import check_image, clip_pixels, resize_u8
from ..pipeline.poses import LATENT_SCALE, check_output_size, check_uv
from ..loaders.subject_file import (LoraDelta, apply_subject, check_kind, clone_module, describe_base, find_cached_subject,
                      lora_delta_of, merge_lora, module_place, remember_lora_delta, save_subject, subject_cache_key,
                      weights_digest, weights_fingerprint)
from ..models.unet import POSE_FRAMES

__all__ = ["FinetuneSettings", "vae_settings", "finetune_subject", "finetune_vae_decoder", "subject_cache_key",
           "save_subject", "apply_subject", "find_cached_subject", "lora_delta_of", "subject_loss",
           "vae_reconstruction_loss", "finetune_to_file", "FinetuneResult", "PRECISIONS", "OPTIMIZERS"]

ALGORITHM_VERSION = "1"   # part of every cache key: bump whenever the training arithmetic changes
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
DECODER_RANGES = ("minus1_1", "0_1")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # the attention projections of every transformer block
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# settings that cannot change the result (gradient checkpointing recomputes the same forward)
_NOT_IN_CACHE_KEY = ("gradient_checkpointing",)

Callback = Callable[[int, int, float], None]


@dataclass
class FinetuneSettings:
    """How to finetune. The first block is the API contract (defaults: the paper's/authors' subject
    finetune); the second block are optional refinements with the authors' values as defaults."""

    steps: int = 500
    lr: float = 1e-5
    batch_size: int = 1
    seed: int = 0
    crop: bool = True            # random crop+resize, photo and pose with the same box
    flip: bool = False           # random horizontal flip, photo and pose together
    gradient_checkpointing: bool = False
    precision: str = "fp32"      # fp32 | bf16 | fp16 (autocast over fp32 master weights; fp16 with GradScaler)
    optimizer: str = "adamw"     # adamw | adamw8bit (bitsandbytes)
    lora_rank: int = 0           # 0: full UNet+adapter finetune; >0: LoRA on the UNet attention, adapter full

    height: int = 640            # training size of the target (a multiple of 64); conditioning is always 640x512
    width: int = 512
    crop_prob: float = 0.7       # share of samples cropped (authors: 70 % UNet, 100 % VAE)
    crop_min_scale: float = 0.96  # smallest kept side fraction (authors: 615/640 UNet, 589/640 VAE)
    dropout: float = 0.0         # per-sample conditioning dropout, split pose / image / both (stage 1: 0.15)
    lora_alpha: float = 0.0      # 0: = lora_rank (scale 1)
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0   # 0: no clipping
    decoder_range: str = "minus1_1"  # VAE decoder target range; "0_1" = the authors' (washed-out) targets
    clip_only: bool = False      # keep the adapter's VAE-token weights frozen (the paper's CLIP-only ablation)

    def to_dict(self) -> dict:
        return asdict(self)

    def cache_fields(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_CACHE_KEY}
        if not self.clip_only:   # added later: leave the keys of subjects saved before it unchanged
            del fields["clip_only"]
        return fields

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha or self.lora_rank)


def vae_settings(**kw) -> FinetuneSettings:
    """Settings for the VAE decoder finetune: the authors' 1500 steps at lr 5e-5, every sample cropped
    up to 589/640 of the side. (Theirs were 1500 micro-batches of one photo accumulated 4 at a time;
    here 1500 optimizer steps of ``batch_size`` samples.)"""
    return FinetuneSettings(**{"steps": 1500, "lr": 5e-5, "crop_prob": 1.0, "crop_min_scale": 589 / 640, **kw})


def check_settings(settings: FinetuneSettings | None, kind: str = "subject") -> FinetuneSettings:
    """Validate (and default) settings; a DreamPoseError naming the bad field."""
    check_kind(kind)
    if settings is None:
        settings = FinetuneSettings() if kind == "subject" else vae_settings()
    if not isinstance(settings, FinetuneSettings):
        raise DreamPoseError(f"settings must be a FinetuneSettings, got {type(settings).__name__}")
    s = settings
    problems = []
    if not isinstance(s.steps, int) or s.steps < 1:
        problems.append(f"steps must be a whole number ≥ 1 (got {s.steps!r})")
    if not (s.lr > 0 and s.lr < float("inf")):
        problems.append(f"lr must be a positive number (got {s.lr!r})")
    if not isinstance(s.batch_size, int) or s.batch_size < 1:
        problems.append(f"batch_size must be ≥ 1 (got {s.batch_size!r})")
    if s.precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS} (got {s.precision!r})")
    if s.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {OPTIMIZERS} (got {s.optimizer!r})")
    if not isinstance(s.lora_rank, int) or s.lora_rank < 0:
        problems.append(f"lora_rank must be 0 (full finetune) or a positive rank (got {s.lora_rank!r})")
    elif s.lora_rank and kind == "vae":
        problems.append("the VAE decoder finetune is always full: lora_rank must be 0")
    if s.lora_alpha < 0:
        problems.append(f"lora_alpha must be ≥ 0 (got {s.lora_alpha!r})")
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
    if problems:
        raise DreamPoseError("finetune settings: " + "; ".join(problems))
    check_output_size(s.height, s.width)
    return s


def _require_optimizer(settings: FinetuneSettings):
    """The optimizer class, checked before any work (8-bit Adam needs bitsandbytes)."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise DreamPoseError("optimizer 'adamw8bit' needs the bitsandbytes package (pip install bitsandbytes; it "
                             "needs a CUDA GPU); use optimizer 'adamw' otherwise") from exc
    return bnb.optim.AdamW8bit


def _require_peft():
    try:
        import peft
    except ImportError as exc:
        raise DreamPoseError("LoRA finetuning (lora_rank > 0) needs the peft package: pip install peft "
                             "(or use lora_rank 0 for a full finetune)") from exc
    return peft


# --------------------------------------------------------------------------------------------- inputs

def _image_list(images) -> list[torch.Tensor]:
    """Photos → list of ``[3,H,W]`` float32 0..1 CPU tensors (ordinary tensors, never inference ones)."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise DreamPoseError(f"subject photos must be [N,3,H,W], got shape {tuple(images.shape)}")
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = [torch.as_tensor(t) for t in images]
    else:
        raise DreamPoseError("subject photos must be a tensor [N,3,H,W] or a list of [3,H,W], got "
                             f"{type(images).__name__}")
    if not items:
        raise DreamPoseError("no subject photos given: finetuning needs at least one")
    out = []
    for i, t in enumerate(items):
        if t.ndim != 3 or t.shape[0] != 3:
            hint = " (channels last? a ComfyUI IMAGE is [N,H,W,3]: use images.movedim(-1, 1))" \
                if t.ndim == 3 and t.shape[-1] in (3, 4) else ""
            kind = {1: " greyscale", 4: " RGBA"}.get(t.shape[0] if t.ndim == 3 else 0, "")
            raise DreamPoseError(f"subject photo {i} has shape {tuple(t.shape)}{kind}; expected RGB [3,H,W]{hint}")
        if t.dtype == torch.uint8:
            t = t.float() / 255
        t = t.detach().to("cpu", torch.float32).clone()
        if not torch.isfinite(t).all():
            raise DreamPoseError(f"subject photo {i} contains NaN or infinite values")
        if t.min() < -1e-3 or t.max() > 1 + 1e-3:
            raise DreamPoseError(f"subject photo {i} has values {t.min():.3g}..{t.max():.3g}; expected 0..1 "
                                 "(a ComfyUI IMAGE or a tensor divided by 255)")
        out.append(t.clamp(0, 1))
    return out


def _pose_list(uv, count: int) -> list[torch.Tensor]:
    items = list(uv) if isinstance(uv, (list, tuple)) else list(check_uv(uv))
    items = [check_uv(t)[0].detach().to("cpu", torch.float32).clone() for t in items]
    if len(items) != count:
        raise DreamPoseError(f"{count} subject photo(s) but {len(items)} DensePose UV frame(s): give exactly one UV "
                             "frame per photo, in the same order")
    return items


def _resize(x: torch.Tensor, height: int, width: int, antialias: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x.unsqueeze(0), (height, width), mode="bilinear", align_corners=False,
                         antialias=antialias)[0]


def _training_device(model_module, device) -> torch.device:
    return torch.device(device) if device is not None else module_place(model_module)[0]


@contextlib.contextmanager
def _training_mode():
    """Out of inference mode (ComfyUI runs nodes inside it) and with gradients on."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    try:
        return torch.autocast(device.type, dtype=_AUTOCAST[precision])
    except RuntimeError as exc:
        raise DreamPoseError(f"precision {precision!r} is not supported on {device} ({exc}); use fp32") from exc


def _randn(shape, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


@torch.no_grad()
def _latent_dist(vae, pixels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (fp32, on ``device``) of the VAE posterior of pixels already in its input range;
    the VAE runs where it is, in its own dtype."""
    vae_device, vae_dtype = module_place(vae)
    dist = vae.encode(pixels.to(vae_device, vae_dtype)).latent_dist
    return dist.mean.float().to(device), dist.std.float().to(device)


class _Batches:
    """Photo indices for each step: passes over the photos in a seeded random order."""

    def __init__(self, count: int, generator: torch.Generator):
        self.count, self.generator, self.order = count, generator, []

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = torch.randperm(self.count, generator=self.generator).tolist()
            out.append(self.order.pop(0))
        return out


# --------------------------------------------------------------------------------------------- subject data

@dataclass
class _SubjectData:
    targets: list[torch.Tensor]   # [3,H,W] 0..1 at training size (CPU)
    poses: list[torch.Tensor]     # [2,H,W] raw UV at training size (CPU)
    clip: torch.Tensor            # [N,T,D] CLIP tokens of each photo (device, fp32)
    cond_mean: torch.Tensor       # [N,4,80,64] VAE posterior of each photo in the convention's range
    cond_std: torch.Tensor
    null_clip: torch.Tensor       # [1,T,D] CLIP tokens of the black null image
    null_mean: torch.Tensor       # [1,4,...] VAE posterior of the convention's null image
    null_std: torch.Tensor


def _prepare_subject(model, images: list[torch.Tensor], poses: list[torch.Tensor], settings: FinetuneSettings,
                     device: torch.device) -> _SubjectData:
    """Resize photos/poses to the training size; encode every photo's condition once (frozen CLIP, VAE)."""
    h, w = settings.height, settings.width
    targets = [_resize(img, h, w, antialias=True) for img in images]
    pose_maps = [_resize(p, h, w, antialias=False) for p in poses]   # bilinear like make_pose_windows
    clip_device, clip_dtype = module_place(model.clip)
    clip_tokens, means, stds = [], [], []
    null_in = None
    with torch.no_grad():
        for img in images:
            key_u8 = resize_u8(check_image(img), COND_HEIGHT, COND_WIDTH)
            pixels = clip_pixels(key_u8).to(clip_device, clip_dtype)
            clip_tokens.append(model.clip(pixel_values=pixels).last_hidden_state.float().to(device))
            key_in, null_in = vae_inputs(key_u8, model.convention)
            mean, std = _latent_dist(model.vae, key_in, device)
            means.append(mean)
            stds.append(std)
        black = clip_pixels(torch.zeros(1, 3, COND_HEIGHT, COND_WIDTH, dtype=torch.uint8)).to(clip_device, clip_dtype)
        null_clip = model.clip(pixel_values=black).last_hidden_state.float().to(device)
        null_mean, null_std = _latent_dist(model.vae, null_in, device)
    return _SubjectData(targets, pose_maps, torch.cat(clip_tokens), torch.cat(means), torch.cat(stds),
                        null_clip, null_mean, null_std)


@dataclass
class _SubjectBatch:
    target: torch.Tensor      # [B,3,H,W] −1..1 (CPU)
    pose: torch.Tensor        # [B,10,h,w] normalised, at latent size (CPU)
    indices: list[int]
    drop_image: torch.Tensor  # [B] bool
    drop_pose: torch.Tensor   # [B] bool


def _pose_channels(pose_uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Raw UV ``[B,2,H,W]`` → the UNet's 10 pose channels at latent size, exactly as the sampler builds
    them: (x−0.5)/0.5, nearest to latent size, the same pose in all five window slots."""
    lat = F.interpolate((pose_uv - 0.5) / 0.5, (height // LATENT_SCALE, width // LATENT_SCALE), mode="nearest")
    return lat.repeat(1, POSE_FRAMES, 1, 1)


def _subject_batch(data: _SubjectData, indices: list[int], settings: FinetuneSettings, generator,
                   augment: bool = True) -> _SubjectBatch:
    imgs, poses, drop_i, drop_p = [], [], [], []
    r = settings.dropout
    for i in indices:
        if augment:
            img, pose, _ = augment_pair(data.targets[i], data.poses[i], generator, crop=settings.crop,
                                        crop_prob=settings.crop_prob, min_scale=settings.crop_min_scale,
                                        flip=settings.flip)
            u = torch.rand(1, generator=generator, dtype=torch.float64).item()
        else:
            img, pose, u = data.targets[i], data.poses[i], 1.0
        imgs.append(img)
        poses.append(pose)
        # per sample (quirk #20): [0, r/3) pose only, [r/3, 2r/3) image only, [2r/3, r) both
        drop_p.append(u < r / 3 or r * 2 / 3 <= u < r)
        drop_i.append(r / 3 <= u < r)
    target = torch.stack(imgs) * 2 - 1
    pose = _pose_channels(torch.stack(poses), settings.height, settings.width)
    return _SubjectBatch(target, pose, list(indices), torch.tensor(drop_i), torch.tensor(drop_p))


def _noise_scheduler(model) -> DDPMScheduler:
    config = {k: v for k, v in dict(model.scheduler_config).items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config)


def _subject_loss(unet, adapter, vae, data: _SubjectData, batch: _SubjectBatch, scheduler: DDPMScheduler,
                  generator, device, precision: str, timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """ε-MSE for one batch; the draws (target sample, conditioning sample, t, ε) come from ``generator``."""
    n = len(batch.indices)
    idx = torch.tensor(batch.indices, device=device)
    t_mean, t_std = _latent_dist(vae, batch.target, device)
    z0 = (t_mean + t_std * _randn(t_mean.shape, generator, device)) * VAE_SCALE
    c_mean, c_std = data.cond_mean[idx], data.cond_std[idx]
    cond_lat = (c_mean + c_std * _randn(c_mean.shape, generator, device)) * VAE_SCALE
    drop_image = batch.drop_image.to(device)
    pose = batch.pose.to(device)
    if batch.drop_pose.any():
        pose = torch.where(batch.drop_pose.to(device).view(-1, 1, 1, 1), torch.zeros_like(pose), pose)
    null_lat = None
    if drop_image.any():
        null_lat = (data.null_mean + data.null_std * _randn(data.null_mean.shape, generator, device)) * VAE_SCALE
    t = timesteps if timesteps is not None else torch.randint(0, scheduler.config.num_train_timesteps, (n,),
                                                                generator=generator)
    t = t.to(device)
    noise = _randn(z0.shape, generator, device)
    noisy = scheduler.add_noise(z0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(z0, noise, t)
    else:
        target = noise
    with _autocast(device, precision):
        hidden = adapter(data.clip[idx], cond_lat)
        if null_lat is not None:
            # its own adapter call: the official null latent is transposed, it cannot share a batch
            null_hidden = adapter(data.null_clip, null_lat)
            hidden = torch.where(drop_image.view(-1, 1, 1), null_hidden.expand_as(hidden), hidden)
        pred = unet(torch.cat([noisy, pose], dim=1), t, encoder_hidden_states=hidden).sample
    return F.mse_loss(pred.float(), target.float())


# --------------------------------------------------------------------------------------------- training loop

def _optimise(params: list[torch.nn.Parameter], settings: FinetuneSettings, device: torch.device, loss_fn,
              callback: Callback | None) -> None:
    """The shared loop: AdamW(β 0.9/0.999, ε 1e-8), constant lr, grad-norm clip, optional fp16 scaler."""
    optimizer_class = _require_optimizer(settings)
    optimizer = optimizer_class(params, lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay,
                                eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    for step in range(1, settings.steps + 1):
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise DreamPoseError(f"the finetune diverged at step {step} (loss {loss.item()}); lower lr or use "
                                 "precision fp32")
        scaler.scale(loss).backward()
        if settings.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if callback is not None:
            callback(step, settings.steps, float(loss.detach()))


def _inject_lora(unet, settings: FinetuneSettings) -> list[torch.nn.Parameter]:
    """peft LoRA layers on every attention projection (seeded init: A Kaiming, B zero → no change at start)."""
    peft = _require_peft()
    config = peft.LoraConfig(r=settings.lora_rank, lora_alpha=settings.effective_lora_alpha,
                             target_modules=list(LORA_TARGETS), lora_dropout=0.0, init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        peft.inject_adapter_in_model(config, unet)
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "lora_A" in n or "lora_B" in n]
    if not params:
        raise DreamPoseError("the UNet has no attention projections (to_q/to_k/to_v/to_out.0) to put LoRA on")
    for p in params:
        p.requires_grad_(True)
    return params


def _extract_lora(unet, settings: FinetuneSettings, base_fingerprint, base_digest) -> LoraDelta:
    from peft.tuners.lora import LoraLayer

    factors = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().float().cpu().clone()
            b = module.lora_B["default"].weight.detach().float().cpu().clone()
            factors[name] = (a, b)
    return LoraDelta(factors, settings.lora_rank, settings.effective_lora_alpha, base_fingerprint, base_digest)


def finetune_subject(model, images, uv, settings: FinetuneSettings | None = None, *, device=None,
                     callback: Callback | None = None):
    """Finetune UNet + adapter on subject photos ``images`` (``[N,3,H,W]`` 0..1, any size, or a list of
    ``[3,H,W]``) with their DensePose ``uv`` (``[N,2,h,w]``, one per photo); returns a NEW model.

    ``device``: where to train (default: where the UNet is). ``callback(step, total, loss)`` after
    every optimizer step; raising from it cancels (nothing is returned or saved).
    """
    settings = check_settings(settings, "subject")
    _require_optimizer(settings)
    if settings.lora_rank:
        _require_peft()
    with _training_mode():
        photos = _image_list(images)
        poses = _pose_list(uv, len(photos))
        device = _training_device(model.unet, device)
        out_device, out_dtype = module_place(model.unet)
        ad_device, ad_dtype = module_place(model.adapter)
        generator = torch.Generator().manual_seed(settings.seed)
        data = _prepare_subject(model, photos, poses, settings, device)
        unet = clone_module(model.unet, device, torch.float32).train()
        adapter = clone_module(model.adapter, device, torch.float32).train()
        adapter.requires_grad_(True)
        if settings.lora_rank:
            params = _inject_lora(unet, settings)
        else:
            unet.requires_grad_(True)
            params = list(unet.parameters())
        params += list(adapter.parameters())
        if settings.clip_only:
            hold_vae_tokens_at_zero(adapter)
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        scheduler = _noise_scheduler(model)
        batches = _Batches(len(photos), generator)

        def step_loss():
            batch = _subject_batch(data, batches.take(settings.batch_size), settings, generator)
            return _subject_loss(unet, adapter, model.vae, data, batch, scheduler, generator, device,
                                 settings.precision)

        _optimise(params, settings, device, step_loss, callback)
        data = None  # drop the encoded photos (also held by step_loss) before assembling the result
        adapter = adapter.eval().requires_grad_(False)
        torch.nn.Module.to(adapter, device=ad_device, dtype=ad_dtype)
        if settings.lora_rank:
            delta = _extract_lora(unet, settings, weights_fingerprint(model.unet), weights_digest(model.unet))
            del unet
            result = merge_lora(clone_module(model.unet, out_device, out_dtype), delta)
            remember_lora_delta(result, delta)
        else:
            if settings.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            result = unet.eval().requires_grad_(False)
            torch.nn.Module.to(result, device=out_device, dtype=out_dtype)
    info = dict(model.info, finetuned="unet+adapter",
                finetune={"kind": "subject", "mode": "lora" if settings.lora_rank else "full",
                          "steps": settings.steps, "photos": len(photos), "base": describe_base(model),
                          "settings": settings.to_dict()})
    return model.shallow_copy(unet=result, adapter=adapter, info=info)


# --------------------------------------------------------------------------------------------- VAE decoder

def _decoder_range(x01: torch.Tensor, settings: FinetuneSettings) -> torch.Tensor:
    return x01 * 2 - 1 if settings.decoder_range == "minus1_1" else x01


def _vae_batch(targets: list[torch.Tensor], indices: list[int], settings: FinetuneSettings, generator,
               augment: bool = True) -> torch.Tensor:
    out = []
    for i in indices:
        img = targets[i]
        if augment:
            img, _, _ = augment_pair(img, None, generator, crop=settings.crop, crop_prob=settings.crop_prob,
                                     min_scale=settings.crop_min_scale, flip=settings.flip)
        out.append(img)
    return _decoder_range(torch.stack(out), settings)


def _vae_loss(vae, x: torch.Tensor, generator, device, precision: str) -> torch.Tensor:
    """MSE of decode(sample of encode(x)) vs x, both clamped to −1..1 as the authors did."""
    x = x.to(device)
    with _autocast(device, precision):
        with torch.no_grad():   # encoder and quant_conv are frozen
            dist = vae.encode(x).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        z = mean + std * _randn(mean.shape, generator, device)
        recon = vae.decode(z).sample
    return F.mse_loss(recon.float().clamp(-1, 1), x.float().clamp(-1, 1))


def finetune_vae_decoder(model, images, settings: FinetuneSettings | None = None, *, device=None,
                         callback: Callback | None = None):
    """Finetune the VAE decoder alone (encoder, quant_conv, post_quant_conv frozen, as the authors) to
    reconstruct the subject photos; returns a NEW model sharing everything but the VAE.

    Targets: the augmented photos in −1..1 (what ``decode_latents`` maps to 0..1, in both conventions:
    the convention only concerns the conditioning path), or 0..1 with ``decoder_range="0_1"``.
    Draws per step: (a permutation when a pass starts), each sample's augmentation, the latent sample.
    """
    settings = check_settings(settings or vae_settings(), "vae")
    _require_optimizer(settings)
    with _training_mode():
        photos = _image_list(images)
        device = _training_device(model.vae, device)
        out_device, out_dtype = module_place(model.vae)
        generator = torch.Generator().manual_seed(settings.seed)
        targets = [_resize(img, settings.height, settings.width, antialias=True) for img in photos]
        vae = clone_module(model.vae, device, torch.float32).train()
        vae.decoder.requires_grad_(True)
        params = list(vae.decoder.parameters())
        if settings.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        batches = _Batches(len(photos), generator)

        def step_loss():
            x = _vae_batch(targets, batches.take(settings.batch_size), settings, generator)
            return _vae_loss(vae, x, generator, device, settings.precision)

        _optimise(params, settings, device, step_loss, callback)
        if settings.gradient_checkpointing:
            vae.disable_gradient_checkpointing()
        vae = vae.eval().requires_grad_(False)
        torch.nn.Module.to(vae, device=out_device, dtype=out_dtype)
    info = dict(model.info, finetuned_vae="vae_decoder",
                vae_finetune={"kind": "vae", "mode": "full", "steps": settings.steps, "photos": len(photos),
                              "base": describe_base(model), "settings": settings.to_dict()})
    return model.shallow_copy(vae=vae, info=info)


# --------------------------------------------------------------------------------------------- evaluation

def subject_loss(model, images, uv, settings: FinetuneSettings | None = None, *, seed: int = 1234,
                 timesteps: Sequence[int] = (50, 250, 500, 750, 950), device=None) -> float:
    """Mean ε-MSE of ``model`` on the un-augmented photos at fixed timesteps and seeded noise, no
    dropout: a fair before/after comparison (the training loss is noisy, it draws t at random)."""
    settings = check_settings(replace(settings or FinetuneSettings(), dropout=0.0), "subject")
    with torch.inference_mode(False), torch.no_grad():
        photos = _image_list(images)
        poses = _pose_list(uv, len(photos))
        device = _training_device(model.unet, device)
        data = _prepare_subject(model, photos, poses, settings, device)
        generator = torch.Generator().manual_seed(seed)
        scheduler = _noise_scheduler(model)
        losses = []
        for i in range(len(photos)):
            batch = _subject_batch(data, [i], settings, generator, augment=False)
            for t in timesteps:
                losses.append(float(_subject_loss(model.unet, model.adapter, model.vae, data, batch, scheduler,
                                                  generator, device, "fp32", torch.tensor([int(t)]))))
    return sum(losses) / len(losses)


def vae_reconstruction_loss(model, images, settings: FinetuneSettings | None = None, *, seed: int = 1234,
                            device=None) -> float:
    """Mean decoder MSE on the un-augmented photos with a seeded latent sample."""
    settings = check_settings(settings or vae_settings(), "vae")
    with torch.inference_mode(False), torch.no_grad():
        photos = _image_list(images)
        device = _training_device(model.vae, device)
        targets = [_resize(img, settings.height, settings.width, antialias=True) for img in photos]
        generator = torch.Generator().manual_seed(seed)
        x = _vae_batch(targets, list(range(len(targets))), settings, generator, augment=False)
        vae = model.vae
        vae_device, vae_dtype = module_place(vae)
        dist = vae.encode(x.to(vae_device, vae_dtype)).latent_dist
        z = dist.mean.float() + dist.std.float() * _randn(dist.mean.shape, generator, vae_device)
        recon = vae.decode(z.to(vae_dtype)).sample.float()
        return float(F.mse_loss(recon.clamp(-1, 1), x.to(vae_device).clamp(-1, 1)))


# --------------------------------------------------------------------------------------------- one call

@dataclass
class FinetuneResult:
    model: object          # the finetuned DreamPoseModel
    path: str              # the saved (or reused) file
    cached: bool           # True: an identical finetune was found and applied, nothing trained
    steps_trained: int
    cache_key: str
    seconds: float


def finetune_to_file(kind: str, model, images, uv, settings: FinetuneSettings | None, path: str, *,
                     force: bool = False, device=None, callback: Callback | None = None,
                     base: str | None = None, search_folder: str | None = None) -> FinetuneResult:
    """Cache lookup → finetune → atomic save, the way the command line (and a node) runs it.

    Reuses ``path`` when its metadata holds the same cache key (or another file in ``search_folder``
    does), unless ``force``. A cancelled run (``callback`` raising) leaves no file behind.
    """
    check_kind(kind)
    settings = check_settings(settings, kind)
    t0 = time.perf_counter()
    key = subject_cache_key(model, images, uv if kind == "subject" else None, settings, kind)
    if not force:
        hit = None
        if os.path.isfile(path) and _cache_key_of(path) == key:
            hit = path
        elif search_folder:
            hit = find_cached_subject(search_folder, key)
        if hit:
            return FinetuneResult(apply_subject(model, hit), hit, True, 0, key, time.perf_counter() - t0)
    if kind == "subject":
        new = finetune_subject(model, images, uv, settings, device=device, callback=callback)
    else:
        new = finetune_vae_decoder(model, images, settings, device=device, callback=callback)
    saved = save_subject(new, path, kind=kind, settings=settings, cache_key=key, base=base or describe_base(model),
                         lora=bool(settings.lora_rank))
    return FinetuneResult(new, saved, False, settings.steps, key, time.perf_counter() - t0)



def _cache_key_of(path: str) -> str | None:
    try:
        return read_metadata(path).get("cache_key")
    except DreamPoseError:
        return None
