"""Subject finetuning, the paper's second stage (§4.3): UNet + adapter, then the VAE decoder.

``finetune_subject`` teaches the UNet and the adapter one person from a few photos, each with its
own DensePose: the loss is the ε-prediction MSE of Stable Diffusion, on the VAE latent of the photo
noised to a random DDPM timestep of the SD 1.x schedule, with the pose concatenated to the noisy
latent (the same pose five times, as the authors' finetune dataset stacked it: a single photo has no
neighbouring frames) and the cross-attention states computed from the photo itself through CLIP,
the VAE and the adapter in the model's conditioning convention. ``finetune_vae_decoder`` then trains
the decoder alone to reconstruct the photos.

Where this differs from the authors' scripts on purpose (docs/official-code.md, §6 and the quirks):

* The loss target is the *augmented* photo and the pose gets the same crop (quirk #19: their target
  was the un-cropped photo while the pose was cropped). See :mod:`dreampose.training.augment`.
* CLIP sees the real uint8 photo with CLIPProcessor's arithmetic (quirk #7: their [0,1] tensors
  were rescaled twice and CLIP saw an almost black image).
* The conditioning image (un-augmented, as at inference) is encoded once: CLIP tokens and the VAE
  latent distribution are computed once per photo, and the VAE latent is re-sampled every step from
  that distribution, as their per-step ``latent_dist.sample()`` did.
* Targets are in −1..1, the range decoding (``pipeline.sampling.decode``) maps back to 0..1. The authors trained on 0..1
  photos (the washed-out outputs of their issues #25/#33, hidden by a per-frame stretch); the VAE
  decoder finetune offers their range as ``decoder_range="0_1"`` for parity only.
* Conditioning dropout, off by default as in their finetune (``dropout_rate=0``), is per sample when
  enabled (quirk #20), split equally into pose / image / both, with the sampler's nulls (zero pose
  after normalisation, the convention's null image).
* Every random draw comes from one CPU generator seeded by ``settings.seed`` (LoRA's initial
  factors from the global RNG, forked and seeded with it), so a seed gives the same weights on
  every run on the same device; the final weights are returned whatever the step count (quirk
  #21); ``module.`` prefixes never arise (quirk #17).
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
import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import DreamPoseError
from ..files.weights import read_metadata
from ..loaders.components import clone_module
from ..loaders.subject_file import apply_subject, base_identity, describe_base, find_cached_subject, save_subject
from ..models.adapter import hold_vae_tokens_at_zero
from ..models.devices import module_place, randn
from ..models.fingerprint import tensor_bytes, weights_digest, weights_fingerprint
from ..models.lora import LORA_TARGETS, LoraDelta, merge_lora, remember_lora_delta
from ..pipeline.poses import check_uv
from ..settings import VAE_SCALE, FinetuneSettings, check_kind, check_settings, vae_settings
from .augment import augment_pair
from ..pipeline.images import condition_frame
from .objective import (denoising_loss, dropout_flags, frozen_condition, latent_distribution,
                        noise_scheduler, noisy_and_target, null_condition, pose_channels, resize)

ALGORITHM_VERSION = "1"   # part of every cache key: bump whenever the training arithmetic changes
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

Callback = Callable[[int, int, float], None]


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


def require_peft():
    try:
        import peft
    except ImportError as exc:
        raise DreamPoseError("LoRA finetuning (lora_rank > 0) needs the peft package: pip install peft "
                             "(or use lora_rank 0 for a full finetune)") from exc
    return peft


def lora_rank_limit(unet) -> int:
    """The largest useful LoRA rank on ``unet``: the largest ``min(in, out)`` of the attention projections a LoRA
    goes on (``LORA_TARGETS``). A higher rank exceeds the full rank of every one of them: more parameters and
    memory than a full finetune of those layers, for nothing. 0 when the UNet has none."""
    widths = [min(m.in_features, m.out_features) for name, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS)]
    return max(widths, default=0)


def check_lora_rank(unet, rank: int) -> None:
    """Refuse a LoRA rank this UNet cannot use, before any work (the bound of the settings is checked there)."""
    if not rank:
        return
    limit = lora_rank_limit(unet)
    if not limit:
        raise DreamPoseError("the UNet has no attention projections (to_q/to_k/to_v/to_out.0) to put LoRA on; use "
                             "lora_rank 0 for a full finetune")
    if rank > limit:
        raise DreamPoseError(f"lora_rank {rank} is larger than this UNet's attention layers allow (at most {limit}, "
                             f"their width): a higher rank only costs memory; use a rank from 1 to {limit}")


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


def subject_cache_key(model, images, uv, settings, kind: str) -> str:
    """sha256 of all that decides a finetune's result: a saved finetune with this key is this very finetune.

    Hashed: photos, poses, the weights the finetune starts from and uses, convention and schedule (``subject``
    only), settings (all but ``gradient_checkpointing``, which recomputes the same numbers) and the algorithm
    version. Photos and poses are hashed in a canonical form, so a batch tensor and a list of the same photos (a
    node and the command line) give the same key.

    Args:
        model: the model the finetune starts from.
        images: the subject photos, as :func:`finetune_subject` takes them.
        uv: their DensePose UV, one frame per photo, as :func:`finetune_subject` takes it.
        settings: the :class:`~dreampose.settings.FinetuneSettings` (``None``: the kind's defaults).
        kind: ``subject`` (UNet+adapter: hashes UNet, adapter, VAE and CLIP, all of which take part) or ``vae``
            (decoder: hashes the VAE only; ``uv`` is ignored).

    Returns:
        The hex digest, 64 characters.
    """
    check_kind(kind)
    settings = check_settings(settings, kind)
    h = hashlib.sha256()
    header = {"algorithm": ALGORITHM_VERSION, "kind": kind, "settings": settings.cache_fields()}
    if kind == "subject":
        header.update(convention=model.convention, scheduler=dict(model.scheduler_config))
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    if kind == "subject":
        h.update(weights_digest(model.unet, model.adapter, model.vae, model.clip).encode())
    else:
        h.update(weights_digest(model.vae).encode())
    with torch.inference_mode(False):
        # canonical form (one float32 0..1 tensor per photo, one float32 UV map per pose), so a batch
        # tensor and a list of the same photos (a node and the command line) give the same key
        photos = _image_list(images)
        for t in photos:
            h.update(f"image{tuple(t.shape)}|".encode() + tensor_bytes(t))
        if kind == "subject":
            if uv is None:
                raise DreamPoseError("a subject finetune's cache key needs the poses")
            for t in _pose_list(uv, len(photos)):
                h.update(f"pose{tuple(t.shape)}|".encode() + tensor_bytes(t))
    return h.hexdigest()


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
    targets = [resize(img, h, w, antialias=True) for img in images]
    pose_maps = [resize(p, h, w, antialias=False) for p in poses]   # bilinear like make_pose_windows
    encoded = [frozen_condition(model.clip, model.vae, condition_frame(img), model.convention, device)
               for img in images]
    null_clip, null_mean, null_std = null_condition(model.clip, model.vae, model.convention, device)
    tokens, means, stds = zip(*encoded)
    return _SubjectData(targets, pose_maps, torch.cat(tokens), torch.cat(means), torch.cat(stds),
                        null_clip, null_mean, null_std)


@dataclass
class _SubjectBatch:
    target: torch.Tensor      # [B,3,H,W] −1..1 (CPU)
    pose: torch.Tensor        # [B,10,h,w] normalised, at latent size (CPU)
    indices: list[int]
    drop_image: torch.Tensor  # [B] bool
    drop_pose: torch.Tensor   # [B] bool


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
        drop_image, drop_pose = dropout_flags(u, r)
        drop_i.append(drop_image)
        drop_p.append(drop_pose)
    target = torch.stack(imgs) * 2 - 1
    pose = pose_channels(torch.stack(poses), settings.height, settings.width)
    return _SubjectBatch(target, pose, list(indices), torch.tensor(drop_i), torch.tensor(drop_p))


def _subject_loss(unet, adapter, vae, data: _SubjectData, batch: _SubjectBatch, scheduler,
                  generator, device, precision: str, timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """ε-MSE for one batch; the draws (target sample, conditioning sample, t, ε) come from ``generator``."""
    n = len(batch.indices)
    idx = torch.tensor(batch.indices, device=device)
    t_mean, t_std = latent_distribution(vae, batch.target, device)
    z0 = (t_mean + t_std * randn(t_mean.shape, generator, device)) * VAE_SCALE
    c_mean, c_std = data.cond_mean[idx], data.cond_std[idx]
    cond_lat = (c_mean + c_std * randn(c_mean.shape, generator, device)) * VAE_SCALE
    drop_image = batch.drop_image.to(device)
    pose = batch.pose.to(device)
    if batch.drop_pose.any():
        pose = torch.where(batch.drop_pose.to(device).view(-1, 1, 1, 1), torch.zeros_like(pose), pose)
    null_lat = None
    if drop_image.any():
        null_lat = (data.null_mean + data.null_std * randn(data.null_mean.shape, generator, device)) * VAE_SCALE
    t = timesteps if timesteps is not None else torch.randint(0, scheduler.config.num_train_timesteps, (n,),
                                                                generator=generator)
    t = t.to(device)
    noise = randn(z0.shape, generator, device)
    noisy, target = noisy_and_target(scheduler, z0, noise, t)
    with _autocast(device, precision):
        hidden = adapter(data.clip[idx], cond_lat)
        if null_lat is not None:
            # its own adapter call: the official null latent is transposed, it cannot share a batch
            null_hidden = adapter(data.null_clip, null_lat)
            hidden = torch.where(drop_image.view(-1, 1, 1), null_hidden.expand_as(hidden), hidden)
        pred = unet(torch.cat([noisy, pose], dim=1), t, encoder_hidden_states=hidden).sample
    return denoising_loss(pred, target)


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
    peft = require_peft()
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
    """Finetune UNet + adapter on subject photos with their DensePose; returns a NEW model.

    The input model is not changed: the UNet and adapter are trained as fp32 copies on the training device.

    Args:
        model: the :class:`~dreampose.models.bundle.DreamPoseModel` to start from.
        images: the subject photos, ``[N,3,H,W]`` 0..1 (uint8 is divided by 255), any size, or a list of
            ``[3,H,W]``.
        uv: their DensePose UV, ``[N,2,h,w]`` (or a list of ``[2,h,w]``), one per photo, in the same order.
        settings: a :class:`~dreampose.settings.FinetuneSettings` (``None``: the authors' finetune);
            ``lora_rank > 0`` trains a LoRA of the UNet's attention projections instead of the whole UNet.
        device: where to train (default: where the UNet is).
        callback: ``callback(step, total, loss)`` after every optimizer step; raising from it cancels (nothing is
            returned or saved).

    Returns:
        A new :class:`~dreampose.models.bundle.DreamPoseModel`: the finetuned UNet (a LoRA merged in, and
        remembered for ``save_subject(lora=True)``) and adapter in the dtype and on the device of the ones they
        replace, the VAE and CLIP shared with ``model``; its ``info`` records the finetune.
    """
    settings = check_settings(settings, "subject")
    _require_optimizer(settings)
    if settings.lora_rank:
        require_peft()
        check_lora_rank(model.unet, settings.lora_rank)
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
        scheduler = noise_scheduler(model)
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


def _vae_loss(vae, x: torch.Tensor, generator, device, precision: str, loss: str = "mse") -> torch.Tensor:
    """MSE (the authors') or L1 of decode(sample of encode(x)) vs x, both clamped to −1..1 as the authors did."""
    x = x.to(device)
    with _autocast(device, precision):
        with torch.no_grad():   # encoder and quant_conv are frozen
            dist = vae.encode(x).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        z = mean + std * randn(mean.shape, generator, device)
        recon = vae.decode(z).sample
    recon, x = recon.float().clamp(-1, 1), x.float().clamp(-1, 1)
    return F.l1_loss(recon, x) if loss == "l1" else F.mse_loss(recon, x)


def _blend_toward(decoder: torch.nn.Module, base: torch.nn.Module, keep: float) -> None:
    """Set the trained ``decoder`` to base + keep·(trained − base), in place and in its (fp32) dtype.

    Keeping only part of a one-photo finetune's change holds the decoder nearer the base on latents unlike the
    photo's: the demo's rim of body colour around other poses fades (docs/benchmarks.md)."""
    if keep == 1:
        return
    base_state = base.state_dict()
    with torch.no_grad():
        for name, value in decoder.state_dict().items():
            if value.is_floating_point():
                start = base_state[name].to(value.device, value.dtype)
                value.copy_(start + keep * (value - start))


def finetune_vae_decoder(model, images, settings: FinetuneSettings | None = None, *, device=None,
                         callback: Callback | None = None):
    """Finetune the VAE decoder alone to reconstruct the subject photos; returns a NEW model sharing all but the VAE.

    The encoder, ``quant_conv`` and ``post_quant_conv`` stay frozen, as the authors'. Targets: the augmented
    photos in −1..1 (what decoding maps to 0..1, in both conventions: the convention only concerns the
    conditioning path), or 0..1 with ``decoder_range="0_1"``; the loss is ``decoder_loss`` (MSE or L1), and
    ``decoder_blend`` < 1 keeps only that share of the weight change at the end. Draws per step: (a
    permutation when a pass starts), each sample's augmentation, the latent sample.

    Args:
        model: the :class:`~dreampose.models.bundle.DreamPoseModel` to start from (not changed).
        images: the subject photos, as :func:`finetune_subject` takes them.
        settings: a :class:`~dreampose.settings.FinetuneSettings` (``None``:
            :func:`~dreampose.settings.vae_settings`, the authors' decoder finetune).
        device: where to train (default: where the VAE is).
        callback: ``callback(step, total, loss)`` after every optimizer step; raising from it cancels.

    Returns:
        A new :class:`~dreampose.models.bundle.DreamPoseModel` whose VAE, in the dtype and on the device of the
        old one, has the finetuned decoder; its ``info`` records the finetune.
    """
    settings = check_settings(settings or vae_settings(), "vae")
    _require_optimizer(settings)
    with _training_mode():
        photos = _image_list(images)
        device = _training_device(model.vae, device)
        out_device, out_dtype = module_place(model.vae)
        generator = torch.Generator().manual_seed(settings.seed)
        targets = [resize(img, settings.height, settings.width, antialias=True) for img in photos]
        vae = clone_module(model.vae, device, torch.float32).train()
        vae.decoder.requires_grad_(True)
        params = list(vae.decoder.parameters())
        if settings.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        batches = _Batches(len(photos), generator)

        def step_loss():
            x = _vae_batch(targets, batches.take(settings.batch_size), settings, generator)
            return _vae_loss(vae, x, generator, device, settings.precision, settings.decoder_loss)

        _optimise(params, settings, device, step_loss, callback)
        _blend_toward(vae.decoder, model.vae.decoder, settings.decoder_blend)
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
    """Mean ε-MSE of ``model`` on the un-augmented photos at fixed timesteps and seeded noise, no dropout.

    A fair before/after comparison (the training loss is noisy, it draws t at random). The model's networks
    are used as they are, without autocast.

    Args:
        model, images, uv: as :func:`finetune_subject`.
        settings: only its ``height`` and ``width`` (the size photos and poses are resized to) matter; its
            dropout is ignored. Default: the subject finetune's.
        seed: seed of the noise draws.
        timesteps: the DDPM timesteps every photo is evaluated at.
        device: where to compute (default: where the UNet is).

    Returns:
        The mean loss over every photo and timestep.
    """
    settings = check_settings(replace(settings or FinetuneSettings(), dropout=0.0), "subject")
    with torch.inference_mode(False), torch.no_grad():
        photos = _image_list(images)
        poses = _pose_list(uv, len(photos))
        device = _training_device(model.unet, device)
        data = _prepare_subject(model, photos, poses, settings, device)
        generator = torch.Generator().manual_seed(seed)
        scheduler = noise_scheduler(model)
        losses = []
        for i in range(len(photos)):
            batch = _subject_batch(data, [i], settings, generator, augment=False)
            for t in timesteps:
                losses.append(float(_subject_loss(model.unet, model.adapter, model.vae, data, batch, scheduler,
                                                  generator, device, "fp32", torch.tensor([int(t)]))))
    return sum(losses) / len(losses)


def vae_reconstruction_loss(model, images, settings: FinetuneSettings | None = None, *, seed: int = 1234,
                            device=None) -> float:
    """Mean decoder MSE on the un-augmented photos with a seeded latent sample.

    All photos go through the VAE in one batch, where it is and in its dtype; reconstruction and target are
    clamped to −1..1.

    Args:
        model, images: as :func:`finetune_vae_decoder`.
        settings: its ``height`` and ``width`` (the size photos are resized to) and ``decoder_range`` (the
            target's range). Default: :func:`~dreampose.settings.vae_settings`.
        seed: seed of the latent sample.
        device: not used: the computation runs where the VAE is.

    Returns:
        The mean squared error.
    """
    settings = check_settings(settings or vae_settings(), "vae")
    with torch.inference_mode(False), torch.no_grad():
        photos = _image_list(images)
        device = _training_device(model.vae, device)
        targets = [resize(img, settings.height, settings.width, antialias=True) for img in photos]
        generator = torch.Generator().manual_seed(seed)
        x = _vae_batch(targets, list(range(len(targets))), settings, generator, augment=False)
        vae = model.vae
        vae_device, vae_dtype = module_place(vae)
        dist = vae.encode(x.to(vae_device, vae_dtype)).latent_dist
        z = dist.mean.float() + dist.std.float() * randn(dist.mean.shape, generator, vae_device)
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
                     force: bool = False, overwrite: bool = False, device=None, callback: Callback | None = None,
                     base: str | None = None, search_folders: Sequence[str] = (), borrow=None) -> FinetuneResult:
    """Cache lookup → finetune → atomic save: how the command line and the finetune nodes run it.

    Args:
        kind: ``subject`` (UNet + adapter; ``uv`` one DensePose frame per photo) or ``vae`` (decoder).
        path: where to save; reused when its metadata holds the same cache key, unless ``force``.
        overwrite: a file at ``path`` that does not hold this very finetune is replaced; False (the
            default) refuses it before any training: the user did not ask to lose it.
        search_folders: further folders whose files are reused when one holds the same cache key.
        device: where to train (default: where the networks are).
        borrow: instead of ``device``, a callable returning a context manager that yields the training
            device for the training only (ComfyUI lends its device and loads the frozen networks there).
        callback: ``callback(step, total, loss)`` after every step; raising from it cancels the run and
            no file is written.
        base: the base model's name recorded in the file (default: named from the model's files).

    Returns:
        A :class:`FinetuneResult`: the finetuned (or reloaded) model, the file, whether it was cached.
    """
    check_kind(kind)
    settings = check_settings(settings, kind)
    if kind == "subject":
        check_lora_rank(model.unet, settings.lora_rank)
    t0 = time.perf_counter()
    key = subject_cache_key(model, images, uv if kind == "subject" else None, settings, kind)
    if not force:
        hit = path if os.path.isfile(path) and _cache_key_of(path) == key else None
        for folder in search_folders:
            hit = hit or find_cached_subject(folder, key)
        if hit:
            return FinetuneResult(apply_subject(model, hit), hit, True, 0, key, time.perf_counter() - t0)
    if os.path.exists(path) and not overwrite and _cache_key_of(path) != key:
        what = "another finetune" if _cache_key_of(path) else "a file that is not a finetune of ours"
        raise DreamPoseError(f"{path} already holds {what}; replacing it needs --force (the nodes: another name)")
    with (borrow() if borrow is not None else contextlib.nullcontext(device)) as train_device:
        if kind == "subject":
            new = finetune_subject(model, images, uv, settings, device=train_device, callback=callback)
        else:
            new = finetune_vae_decoder(model, images, settings, device=train_device, callback=callback)
    saved = save_subject(new, path, kind=kind, settings=settings, cache_key=key, base=base or describe_base(model),
                         lora=bool(settings.lora_rank), base_fingerprint=base_identity(model, kind))
    return FinetuneResult(new, saved, False, settings.steps, key, time.perf_counter() - t0)


def _cache_key_of(path: str) -> str | None:
    try:
        return read_metadata(path).get("cache_key")
    except DreamPoseError:
        return None
