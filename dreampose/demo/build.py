"""Building the shipped demo DreamPose: the three steps of ``scripts/train_demo_model.sh`` that are not
``python -m dreampose train`` (``base``, ``package``, ``decoder``).

Real DreamPose starts from Stable Diffusion 1.x and CLIP ViT-B/32, which cannot ship in a package.
The demo therefore builds its own miniature "SD": the same UNet/VAE/CLIP classes at a fraction of
the width, with an autoencoder pretrained on synthetic-world frames (SD's VAE is pretrained too)
and a random, frozen CLIP tower (``base``). Stage 1 is then the real ``python -m dreampose train`` on
synthetic videos, and ``package`` writes the result as one fp16 file with the recipe in its metadata.
The script calls them as ``python -m dreampose.demo_model base|package|decoder`` (that entry name is part of
the recipe stored in the shipped file). ``decoder`` (:func:`pretrain_decoder`: the packaged bundle's VAE
decoder pretrained once more on whole frames, border latents noised) is the recipe's last step: it cures
the band along the frames' edge that a one-photo decoder finetune otherwise paints (docs/benchmarks.md,
"Demo timing").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..configs import default_scheduler_config
from ..data.dataset import find_videos, load_frame
from ..errors import DreamPoseError
from ..files.atomic import atomic_save_safetensors
from ..files.weights import read_metadata, read_state_dict
from ..loaders.components import load_vae
from ..loaders.load import load_dreampose, load_dreampose_file
from ..models.bundle import save_bundle
from ..pipeline.images import resize_u8
from ..settings import DEMO_HEIGHT, DEMO_WIDTH, VAE_SCALE
from .config import DEMO_FILE
from .tiny import write_component

# Widths whose GroupNorm layers have 32 groups, as ComfyUI's own UNet and VAE code computes them, so
# the demo model runs through core's sampling stack as real SD 1.x weights do.
DEMO_UNET = {
    "sample_size": 24, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64, 96],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 32,
}
DEMO_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 32, "sample_size": 192,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": VAE_SCALE,
}
DEMO_CLIP = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": 224, "patch_size": 32, "projection_dim": 64, "hidden_act": "quick_gelu",
}


def demo_networks(seed: int = 0):
    """Freshly initialised (seeded) base UNet (4 channels, like SD), VAE and CLIP vision of the demo sizes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**DEMO_UNET)
        vae = AutoencoderKL(**DEMO_VAE)
        clip = CLIPVisionModel(CLIPVisionConfig(**DEMO_CLIP))
    return unet.eval(), vae.eval(), clip.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ autoencoder

def _kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def _random_crops(frames: torch.Tensor, idx: torch.Tensor, crop: int, g: torch.Generator) -> torch.Tensor:
    h, w = frames.shape[-2:]
    out = []
    for i in idx.tolist():
        top = int(torch.randint(0, h - crop + 1, (), generator=g)) // 8 * 8
        left = int(torch.randint(0, w - crop + 1, (), generator=g)) // 8 * 8
        out.append(frames[i, :, top:top + crop, left:left + crop])
    return torch.stack(out)


def _warmup_cosine(opt, steps: int):
    """A linear warmup over a tenth of the steps (at most 100), then a cosine decay to zero."""
    warmup = max(1, min(100, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def _optimizer_step(opt, sched, loss: torch.Tensor, params: list) -> float:
    """Backward, clip the gradient norm to 1, step the optimizer and the schedule; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item()


def pretrain_autoencoder(vae, frames: torch.Tensor, *, steps: int, batch: int = 16, crop: int = 64, lr: float = 1e-3,
                         kl_weight: float = 1e-6, seed: int = 0, progress=None) -> list[float]:
    """Train the whole VAE as an autoencoder on random ``crop``² crops of ``frames`` ``[N,3,H,W]`` uint8
    (L1 + a light KL, as latent-diffusion autoencoders are trained, without their perceptual/GAN
    terms; crops because the VAE is convolutional and they cost a fraction of whole frames)."""
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise DreamPoseError("pretrain_autoencoder takes [N,3,H,W] uint8 frames")
    g = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, steps)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(0, frames.shape[0], (batch,), generator=g)
            x = _random_crops(frames, idx, min(crop, *frames.shape[-2:]), g).float() / 127.5 - 1
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
            recon = vae.decode(z).sample
            loss = F.l1_loss(recon, x) + kl_weight * _kl(dist.mean, dist.logvar)
            losses.append(_optimizer_step(opt, sched, loss, list(vae.parameters())))
            if progress is not None:
                progress(step + 1, steps, losses[-1])
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def calibrate_latent_scale(vae, frames: torch.Tensor, target_std: float = 1.0) -> float:
    """Rescale the latent space in place so ``VAE_SCALE``·mean has ``target_std`` on these frames.

    DreamPose multiplies latents by SD's fixed 0.18215; SD's VAE was made so that this gives unit
    variance. Scaling the posterior mean by k (and shifting log-variance by 2·ln k) in ``quant_conv``
    and dividing ``post_quant_conv``'s input by k is an exact reparametrisation that does the same
    for our VAE. Returns k.
    """
    means = torch.cat([vae.encode(chunk.float() / 127.5 - 1).latent_dist.mean for chunk in frames.split(16)])
    k = target_std / (VAE_SCALE * means.std().item())
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


# ------------------------------------------------------------------------------------------ base folders

def _load_frames(roots: list[str], height: int, width: int, limit: int) -> torch.Tensor:
    paths = [p for v in find_videos(roots) for p in v.frames]
    step = max(1, len(paths) // limit) if limit else 1
    frames = [load_frame(p) for p in paths[::step]]
    return torch.stack([f if f.shape[-2:] == (height, width) else resize_u8(f, height, width) for f in frames])


def build_base(data: list[str], out: str, *, vae_steps: int, seed: int = 0, height: int = DEMO_HEIGHT,
               width: int = DEMO_WIDTH, max_frames: int = 2048, lr: float = 1e-3, init_vae: str | None = None,
               progress=None) -> dict:
    """Write ``out/sd`` (diffusers layout: random UNet, autoencoder pretrained on ``data``, scheduler)
    and ``out/clip`` (random CLIP vision): the miniature stand-ins for SD 1.x and CLIP ViT-B/32.
    ``init_vae``: continue from this VAE folder (a second pretraining phase) instead of a fresh one."""
    frames = _load_frames(data, height, width, max_frames)
    unet, vae, clip = demo_networks(seed)
    if init_vae:
        vae = load_vae(init_vae)
    t0 = time.perf_counter()
    losses = pretrain_autoencoder(vae, frames, steps=vae_steps, seed=seed, lr=lr, progress=progress)
    k = calibrate_latent_scale(vae, frames[:256])
    sd = os.path.join(out, "sd")
    write_component(unet, os.path.join(sd, "unet"), "diffusion_pytorch_model.safetensors")
    write_component(vae, os.path.join(sd, "vae"), "diffusion_pytorch_model.safetensors")
    os.makedirs(os.path.join(sd, "scheduler"), exist_ok=True)
    with open(os.path.join(sd, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(default_scheduler_config(), f, indent=1)
    clip_dir = os.path.join(out, "clip")
    os.makedirs(clip_dir, exist_ok=True)
    write_component(clip, clip_dir, "model.safetensors")
    info = {"frames": int(frames.shape[0]), "vae_steps": vae_steps, "vae_loss_first": losses[0],
            "vae_loss_last": sum(losses[-20:]) / len(losses[-20:]), "latent_rescale": k,
            "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "base_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


# ------------------------------------------------------------------------------------------ decoder phase

def border_mask(height: int, width: int, border: int) -> torch.Tensor:
    """``[height,width]`` bool: the outer ``border`` rows and columns of a latent."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    if border > 0:
        mask[:border] = mask[-border:] = True
        mask[:, :border] = mask[:, -border:] = True
    return mask


def perturb_border(z: torch.Tensor, border: int, sigma: float, g: torch.Generator) -> torch.Tensor:
    """``z`` ``[B,C,h,w]`` (raw VAE latents) with Gaussian noise of ``sigma`` SD-scaled units (``sigma /
    VAE_SCALE`` raw) added to its outer ``border`` rows and columns only; the interior is returned unchanged."""
    if border <= 0 or sigma <= 0:
        return z
    noise = torch.randn(z.shape, generator=g) * (sigma / VAE_SCALE)
    return torch.where(border_mask(*z.shape[-2:], border).to(z.device), z + noise.to(z), z)


def pretrain_decoder(vae, frames: torch.Tensor, *, steps: int = 300, batch: int = 8, lr: float = 2e-4,
                     border: int = 2, border_noise: float = 1.5, seed: int = 0, progress=None) -> list[float]:
    """Train the VAE's ``post_quant_conv`` + decoder alone on whole ``frames`` ``[N,3,H,W]`` uint8 (L1, random
    horizontal flips, warmup + cosine), with noise on the border latents; encoder and ``quant_conv`` stay
    bit-identical, so the latent space, and a UNet trained in it, stay valid.

    Why: the autoencoder was pretrained on 64² crops and rarely saw a true frame border; its border latents
    depend on the whole picture, and a decoder that reads them closely learns, in the subject finetune on one
    key frame, that photo's border values and paints a band along the edge of every other pose (docs/
    benchmarks.md, "Demo timing"). Whole frames show it the real borders; Gaussian noise of ``border_noise``
    (in SD-scaled latent units, whose std is about 1) on the outer ``border`` latent rows and columns teaches
    it not to trust them."""
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise DreamPoseError("pretrain_decoder takes [N,3,H,W] uint8 frames")
    g = torch.Generator().manual_seed(seed)
    vae.eval().requires_grad_(False)
    trained = [vae.post_quant_conv, vae.decoder]
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, steps)
    losses = []
    for m in trained:
        m.train().requires_grad_(True)
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(0, frames.shape[0], (batch,), generator=g)
            x = frames[idx].float() / 127.5 - 1
            flip = torch.rand(batch, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            with torch.no_grad():
                dist = vae.encode(x).latent_dist
                z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
                z = perturb_border(z, border, border_noise, g)
            loss = F.l1_loss(vae.decode(z).sample, x)
            losses.append(_optimizer_step(opt, sched, loss, params))
            if progress is not None:
                progress(step + 1, steps, losses[-1])
    vae.eval().requires_grad_(False)
    return losses


def decoder_phase(bundle: str, data: list[str], out: str, *, height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH,
                  max_frames: int = 2048, progress=None, meta: dict | None = None, **options) -> dict:
    """:func:`pretrain_decoder` on a trained bundle's VAE; writes ``out`` (atomically): the bundle's tensors
    and metadata unchanged but ``vae.post_quant_conv.*`` and ``vae.decoder.*`` (in the bundle's dtype), plus a
    ``decoder_pretraining`` metadata record and the entries of ``meta`` (e.g. ``training_commands``). Returns
    that record."""
    vae = load_dreampose_file(bundle, dtype=torch.float32)[2]
    if vae is None:
        raise DreamPoseError(f"{bundle}: no VAE in this bundle (train it with --include-vae)")
    frames = _load_frames(data, height, width, max_frames)
    t0 = time.perf_counter()
    losses = pretrain_decoder(vae, frames, progress=progress, **options)
    tensors = read_state_dict(bundle)
    new = {f"vae.{k}": v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    missing = sorted(set(new) - set(tensors))
    if missing:
        raise DreamPoseError(f"{bundle}: its VAE lacks {missing[0]}")
    tensors.update({k: v.to(tensors[k].dtype) for k, v in new.items()})
    record = {"frames": int(frames.shape[0]), **options, "loss_first": losses[0],
              "loss_last": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_save_safetensors(tensors, out, {**read_metadata(bundle), **(meta or {}),
                                           "decoder_pretraining": json.dumps(record)})
    return record


def package(trained: str, clip: str, out: str = DEMO_FILE, **meta) -> str:
    """One self-contained fp16 file: the trained bundle's UNet + adapter + VAE, plus the CLIP tower."""
    model = load_dreampose(clip=clip, dreampose=trained)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return save_bundle(out, model.unet, model.adapter, model.vae, clip=model.clip, dtype=torch.float16,
                       convention=model.convention, scheduler_config=model.scheduler_config,
                       demo_height=DEMO_HEIGHT, demo_width=DEMO_WIDTH, **meta)


def _commands(path: str | None) -> dict:
    """The ``training_commands`` metadata entry from ``--command-file`` (none without one)."""
    if not path:
        return {}
    with open(path) as f:
        return {"training_commands": f.read()}


def _step_printer(label: str):
    """A progress callback that prints every 50th step's loss (and the last) to stderr."""
    def progress(step, total, loss):
        if step % 50 == 0 or step == total:
            print(f"{label} step {step}/{total} loss {loss:.4f}", file=sys.stderr, flush=True)
    return progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreampose.demo_model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    b = sub.add_parser("base", help="miniature SD + CLIP: random UNet and CLIP, autoencoder pretrained on --data")
    b.add_argument("--data", action="append", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--vae-steps", type=int, default=1500)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--init-vae", help="continue pretraining this VAE folder (e.g. an earlier --out's sd/vae)")
    d = sub.add_parser("decoder", help="pretrain a trained bundle's VAE decoder on whole frames, border latents "
                                       "noised (encoder frozen): the band cure, see pretrain_decoder")
    d.add_argument("--bundle", required=True, help="the bundle `python -m dreampose train --include-vae` wrote")
    d.add_argument("--data", action="append", required=True)
    d.add_argument("--out", required=True, help="the new bundle (.safetensors), for `package --trained`")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--lr", type=float, default=2e-4)
    d.add_argument("--border", type=int, default=2, help="latent rows/columns on each side that get noise")
    d.add_argument("--border-noise", type=float, default=1.5, help="its std, in SD-scaled latent units")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--command-file", help="a text file with the exact commands that trained it (replaces the "
                                          "bundle's record of them)")
    p = sub.add_parser("package", help="trained bundle + CLIP → one fp16 file")
    p.add_argument("--trained", required=True)
    p.add_argument("--clip", required=True)
    p.add_argument("--out", default=DEMO_FILE)
    p.add_argument("--command-file", help="a text file with the exact commands that trained it (goes in the metadata)")
    args = parser.parse_args(argv)
    if args.step == "base":
        progress = _step_printer("autoencoder")
        print(json.dumps(build_base(args.data, args.out, vae_steps=args.vae_steps, seed=args.seed, lr=args.lr,
                                    init_vae=args.init_vae, progress=progress), indent=1))
    elif args.step == "decoder":
        progress = _step_printer("decoder")
        print(json.dumps(decoder_phase(args.bundle, args.data, args.out, steps=args.steps, batch=args.batch,
                                       lr=args.lr, border=args.border, border_noise=args.border_noise,
                                       seed=args.seed, progress=progress, meta=_commands(args.command_file)),
                         indent=1))
    else:
        print(package(args.trained, args.clip, args.out, **_commands(args.command_file)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
