"""DreamPose (Karras et al., ICCV 2023) as a plain PyTorch library: no ComfyUI imports here.

One photo of a person and a DensePose sequence in, a video of that person moving out::

    import dreampose
    model = dreampose.load_dreampose(clip="clip-vit-base-patch32/", dreampose="unet_epoch_20.pth",
                                     base="stable-diffusion-v1-5/").place("cuda", torch.float16)
    clip = dreampose.animate_clip(model, image, uv, dreampose.PAPER_SAMPLING)   # clip.frames [F,H,W,3]

The stages (docs/architecture.md): load (``load_dreampose``) → optionally finetune on the subject
(``finetune_subject``, ``finetune_vae_decoder``) → encode the subject once
(``encode_image_condition``) → pose windows (``make_pose_windows``) → dual-guidance sampling and
decoding (``animate``/``generate``, or ``sample`` and ``decode``). Every default lives in
``dreampose.settings``. The names below are imported on first use, so ``import dreampose`` is cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name → the module that defines it
_API = {
    "DreamPoseError": "errors",
    "SamplingOptions": "settings", "FinetuneSettings": "settings", "TrainConfig": "settings",
    "EvalSettings": "settings", "PAPER_SAMPLING": "settings", "DEMO_SAMPLING": "settings",
    "vae_settings": "settings",
    "DreamPoseModel": "models.bundle", "save_bundle": "models.bundle",
    "load_dreampose": "loaders.load", "convert_authors_checkpoint": "loaders.load",
    "apply_subject": "loaders.subject_file", "save_subject": "loaders.subject_file",
    "ImageCondition": "pipeline.conditioning", "encode_image_condition": "pipeline.conditioning",
    "PoseWindows": "pipeline.poses", "make_pose_windows": "pipeline.poses", "load_uv_folder": "pipeline.poses",
    "SampleStats": "pipeline.sampling", "denoise": "pipeline.sampling", "sample": "pipeline.sampling",
    "decode": "pipeline.sampling", "stretch_frames": "pipeline.sampling",
    "Chunk": "pipeline.animate", "Animation": "pipeline.animate", "prepare": "pipeline.animate",
    "generate": "pipeline.animate", "animate": "pipeline.animate", "animate_clip": "pipeline.animate",
    "save_video": "pipeline.video",
    "finetune_subject": "training.finetune", "finetune_vae_decoder": "training.finetune",
    "finetune_to_file": "training.finetune", "train": "training.stage1",
    "load_demo_model": "demo.model", "tiny_dreampose": "demo.tiny",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'dreampose' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
