"""The configs shipped with the package, so SD 1.x, its VAE and scheduler, and CLIP ViT-B/32 can be
built offline: nothing is ever downloaded. Torch-free."""
from __future__ import annotations

import json
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = ("sd15_unet", "sd15_vae", "sd15_scheduler", "clip_vit_b32_vision")


def shipped_config(name: str) -> dict:
    """One of the package's configs: ``sd15_unet``, ``sd15_vae``, ``sd15_scheduler``, ``clip_vit_b32_vision``."""
    with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
        return json.load(f)


def default_scheduler_config() -> dict:
    """SD 1.x's PNDM scheduler config (what the authors sampled with)."""
    return shipped_config("sd15_scheduler")


def clean_config(config) -> dict:
    """A config without the ``_``-prefixed bookkeeping keys diffusers writes (``_class_name``,
    ``_diffusers_version``), which ``from_config`` would otherwise warn about or reject."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
