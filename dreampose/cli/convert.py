"""``python -m dreampose convert``: the authors' ``unet_epoch_N.pth`` (+ ``adapter_N.pth``, optional
``vae_N.pth``) → one of our ``.safetensors`` files, conditioning convention ``official``."""
from __future__ import annotations

import os
import time

from ..errors import DreamPoseError
from ..files.destinations import check_output_file
from .common import check_paths, config_flags, err


def register(sub) -> None:
    p = sub.add_parser("convert", help="the authors' unet_epoch_N.pth (+ adapter, VAE) → our .safetensors")
    p.add_argument("unet", help="the authors' unet_epoch_N.pth")
    p.add_argument("--adapter", help="adapter_N.pth (default: the one beside the UNet file)")
    p.add_argument("--vae", help="the authors' vae_N.pth to include (optional)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--unet-config", help="UNet config JSON, for a UNet that is not SD 1.x sized")
    p.add_argument("--vae-config", help="VAE config JSON, for a VAE that is not SD 1.x sized")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loaders.load import convert_authors_checkpoint

    if not os.path.isfile(args.unet):
        raise DreamPoseError(f"not found: {args.unet} (the authors' unet_epoch_N.pth)")
    check_paths(adapter=args.adapter, vae=args.vae)
    inputs = [("unet", args.unet), ("--adapter", args.adapter), ("--vae", args.vae)]
    need = sum(os.path.getsize(p) for _, p in inputs if p and os.path.isfile(p))   # the same tensors, re-laid
    check_output_file(args.out, "--out", inputs=inputs, force=args.force, suffix=".safetensors", need_bytes=need)
    unet_config, vae_config = config_flags(args)
    err("converting …")
    t0 = time.perf_counter()
    path = convert_authors_checkpoint(args.unet, args.out, adapter_path=args.adapter, vae_path=args.vae,
                                      unet_config=unet_config, vae_config=vae_config)
    size = os.path.getsize(path) / 2**20
    print(f"wrote {path} ({size:.1f} MiB, convention 'official'{', with VAE' if args.vae else ''}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
