"""LoadDreamPose: the model bundle from ComfyUI's model folders, as core objects."""
from __future__ import annotations

import os

import torch
import comfy.model_management as mm
from comfy_api.latest import io

from ..dreampose.configs import clean_config
from ..dreampose.loaders.load import load_dreampose
from ..dreampose.models.devices import dtype_name
from ..dreampose.settings import CONVENTIONS, NODE_DTYPE_CHOICES, VAE_DTYPE_CHOICES
from . import device as dev
from . import folders, native
from .types import DreamPoseModelType


def to_native(model, dtype: str, vae_dtype: str) -> native.NativeModel:
    """A freshly loaded library model → core MODEL, CLIP_VISION and VAE in the host's dtypes (core's
    rules), the adapter in the UNet's compute dtype on the offload device. The library's networks
    are dropped: the weights live in core's objects only."""
    device = mm.get_torch_device()
    weight_dtype = next(model.unet.parameters()).dtype
    unet_dt, cast_dt, fast = dev.unet_dtypes(dtype, device, dev.param_count(model.unet), weight_dtype)
    vae_dt = dev.vae_dtype(vae_dtype, device)
    unet = native.core_unet(model.unet, unet_dt, cast_dt, fp8_optimizations=fast)
    clip = native.core_clip_vision(model.clip, torch.float32)
    vae = native.core_vae(model.vae, vae_dt)
    dev.place(model.adapter, mm.unet_offload_device(), cast_dt or unet_dt)
    info = dict(model.info, unet_dtype=dtype_name(unet_dt), vae_dtype=dtype_name(vae_dt), clip_dtype="fp32")
    return native.NativeModel(unet, clip, vae, model.adapter, model.convention, dict(model.scheduler_config),
                              clean_config(model.unet.config), clean_config(model.vae.config), info)


class LoadDreamPose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadDreamPose",
            display_name="Load DreamPose",
            category="DreamPose/loaders",
            description=(
                "Loads DreamPose: the 14-channel UNet and the CLIP-VAE adapter (the authors' unet_epoch_N.pth with "
                "its adapter_N.pth beside it, or a DreamPose .safetensors), the VAE and CLIP ViT-B/32 vision. "
                "Nothing is downloaded. The model waits on the offload device between runs."),
            inputs=[
                io.Combo.Input(
                    "dreampose_weights", options=folders.dreampose_weight_options(),
                    tooltip="DreamPose weights from models/dreampose: the authors' unet_epoch_N.pth (adapter_N.pth "
                            "must sit beside it) or a DreamPose .safetensors. 'none (fresh from base)' builds an "
                            "untrained DreamPose from the base model, to finetune."),
                io.Combo.Input(
                    "base_model", options=folders.base_model_options(),
                    tooltip="Stable Diffusion 1.x (models/checkpoints file or models/diffusers folder). Needed when "
                            "the weights carry no VAE (the authors' files) and for 'none (fresh from base)'; the VAE "
                            "comes from it unless 'vae' says otherwise."),
                io.Combo.Input(
                    "clip_vision", options=folders.clip_vision_options(),
                    tooltip="CLIP ViT-B/32 vision (openai/clip-vit-base-patch32) from models/clip_vision: a single "
                            ".safetensors or a folder with config.json. Other CLIP sizes do not fit the adapter."),
                io.Combo.Input(
                    "vae", options=folders.vae_options(),
                    tooltip="VAE override: a models/vae file, or a VAE from models/dreampose (e.g. the authors' "
                            "finetuned vae_N.pth). 'from weights or base' takes the weights file's VAE, else the base "
                            "model's."),
                io.Combo.Input(
                    "dtype", options=list(NODE_DTYPE_CHOICES), default="auto",
                    tooltip="Precision of the UNet's weights (the adapter follows its compute dtype; CLIP stays fp32). "
                            "auto: as ComfyUI's UNet loader decides (the --fp16-unet style flags win, else fp16, bf16 "
                            "or fp32 as the device computes them). fp8: weights stored in 8 bits, computed in "
                            "fp16/bf16/fp32 (fp8_e4m3fn_fast: fp8 matrix multiplies where the GPU has them)."),
                io.Combo.Input(
                    "vae_dtype", options=list(VAE_DTYPE_CHOICES), default="auto",
                    tooltip="Precision of the VAE. auto: bf16 where supported, else fp32; never fp16, where the SD VAE "
                            "can overflow to black frames."),
                io.Combo.Input(
                    "convention", options=["auto", *CONVENTIONS], default="auto",
                    tooltip="How the key frame is fed to the VAE branch. auto: what the checkpoint says (the authors' "
                            "files: official). official = the authors' inference math; standard = our training math. "
                            "Use the convention the weights were trained with."),
                io.Combo.Input(
                    "subject", options=folders.subject_options(), default=folders.NONE_SUBJECT,
                    tooltip="A finetune saved by SubjectFinetune or VAEDecoderFinetune (models/dreampose/subjects), "
                            "applied on top of these weights, so a trained subject animates without its photos. Use "
                            "the weights it was trained from. For both finetunes, pick the subject one here and keep "
                            "VAEDecoderFinetune after the loader: with the same photos and settings it reloads its "
                            "file and trains nothing. 'none': the weights as they are."),
            ],
            outputs=[
                DreamPoseModelType.Output(
                    display_name="model",
                    tooltip="The DreamPose model (UNet, adapter, VAE, CLIP vision, convention), for the DreamPose "
                            "nodes."),
                io.Model.Output(display_name="MODEL",
                                tooltip="The DreamPose UNet as a core MODEL (14 input channels; the pose windows "
                                        "arrive as each conditioning's noise_concat): for core LoRA loaders, model "
                                        "patches, DualCFGGuider and the samplers."),
                io.ClipVision.Output(display_name="CLIP_VISION", tooltip="CLIP ViT-B/32 vision as a core CLIP_VISION."),
                io.Vae.Output(display_name="VAE",
                              tooltip="The VAE as a core VAE (VAE Decode, VAE Encode, tiled decode)."),
            ],
        )

    @classmethod
    def execute(cls, dreampose_weights: str, base_model: str, clip_vision: str, vae: str, dtype: str,
                vae_dtype: str, convention: str, subject: str = folders.NONE_SUBJECT) -> io.NodeOutput:
        model = load_dreampose(
            clip=folders.resolve_clip_vision(clip_vision),
            dreampose=folders.resolve_dreampose_weights(dreampose_weights),
            base=folders.resolve_base_model(base_model),
            vae=folders.resolve_vae(vae),
            convention=None if convention == "auto" else convention,
            subject=folders.resolve_subject(subject))
        bundle = to_native(model, dtype, vae_dtype)
        return io.NodeOutput(bundle, bundle.unet, bundle.clip_vision, bundle.vae)

    @classmethod
    def fingerprint_inputs(cls, dreampose_weights, base_model, clip_vision, vae, dtype, vae_dtype, convention,
                           subject=folders.NONE_SUBJECT):
        """Reload when a chosen file is replaced under the same name (a subject retrained, say)."""
        stamps = []
        for resolve, name in ((folders.resolve_dreampose_weights, dreampose_weights),
                              (folders.resolve_base_model, base_model), (folders.resolve_clip_vision, clip_vision),
                              (folders.resolve_vae, vae), (folders.resolve_subject, subject)):
            try:
                path = resolve(name)
                stamps.append(os.path.getmtime(path) if path else None)
            except (ValueError, OSError):
                stamps.append(name)  # execute reports the problem
        return (dreampose_weights, base_model, clip_vision, vae, dtype, vae_dtype, convention, subject, *stamps)
