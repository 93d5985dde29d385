"""SubjectFinetune and VAEDecoderFinetune: teach DreamPose one person from a few photos.

Both nodes are thin: they turn ComfyUI types into the library's, leave ComfyUI's inference mode
(``torch.inference_mode(False)``, inputs cloned), load the input model's frozen networks through
ComfyUI's model management (``device.borrowed``; the host offloads them when it needs the room),
tick a ProgressBar every step with the loss as the node's progress text, and check Cancel every
step. The library's ``finetune_to_file`` does the rest, as for the command line: before training,
a saved finetune with the same cache key (same model, photos, poses and settings) is loaded instead
and no step is trained; the trained weights are saved atomically to
``models/dreampose/subjects/<name>.safetensors``. Both nodes share one schema
(:class:`_FinetuneNode`); their defaults are the settings' (the authors' finetunes).
"""
from __future__ import annotations

import logging
import os
import time

import torch
import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..dreampose.errors import DreamPoseError
from ..dreampose.files.atomic import atomic_save_safetensors
from ..dreampose.files.weights import format_metadata, holds_finetune, read_metadata
from ..dreampose.models.lora import kohya_state, lora_delta_of
from ..dreampose.settings import DECODER_LOSSES, OPTIMIZERS, PRECISIONS, FinetuneSettings, finetune_defaults
from ..dreampose.training.finetune import finetune_to_file
from . import device as dev
from . import folders, native
from .types import DreamPoseModelType, DreamPosePoseType, require_model, require_uv

log = logging.getLogger(__name__)

# Training takes the whole device, as core's TrainLoraNode does: every other loaded model is unloaded first.
TRAINING_MEMORY = 10 ** 20
TEXT_INTERVAL_S = 0.25  # progress text at most this often (and always on the last step)
_BAD_NAME_CHARS = set('<>:"|?*') | {chr(c) for c in range(32)}


def check_name(name: str) -> str:
    """The file name under models/dreampose/subjects: a bare name, ``.safetensors`` added if missing."""
    stripped = (name or "").strip()
    if not stripped:
        raise DreamPoseError("no name given: type a file name for the finetune, e.g. 'alice' (saved as "
                             "models/dreampose/subjects/alice.safetensors)")
    if "/" in stripped or "\\" in stripped or ".." in stripped or stripped.startswith("."):
        raise DreamPoseError(f"name {name!r}: give a plain file name, without folders, '..' or a leading dot; it is "
                             "saved in models/dreampose/subjects/")
    if set(stripped) & _BAD_NAME_CHARS:
        raise DreamPoseError(f"name {name!r}: contains characters a file name cannot hold "
                             "(< > : \" | ? * or control characters)")
    if not stripped.lower().endswith(".safetensors"):
        stripped += ".safetensors"
    return stripped


def _validate_name(name) -> bool | str:
    if name is None:  # linked from another node: checked when it runs
        return True
    try:
        check_name(name)
    except DreamPoseError as exc:
        return str(exc)
    return True


def photos_from_images(images) -> torch.Tensor:
    """ComfyUI IMAGE ``[N,H,W,3]`` → ``[N,3,H,W]`` float 0..1 (an ordinary tensor, safe for autograd)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise DreamPoseError(f"expected a ComfyUI IMAGE batch [count, height, width, channels], got "
                             f"{tuple(getattr(images, 'shape', ()))}")
    if images.shape[-1] == 4:
        raise DreamPoseError("the subject photos are RGBA (4 channels); DreamPose needs RGB: drop the alpha with the "
                             "core 'Split Image with Alpha' node")
    if images.shape[-1] != 3:
        raise DreamPoseError(f"the subject photos have {images.shape[-1]} channels; DreamPose needs RGB images")
    return images.movedim(-1, 1).to(device="cpu", dtype=torch.float32).clone().contiguous()


def subject_poses(poses, photos: int) -> torch.Tensor:
    """The raw UV sequence, one frame per photo, as an ordinary tensor."""
    uv = require_uv(poses)
    if uv.ndim != 4 or uv.shape[1] != 2:
        raise DreamPoseError(f"expected a DensePose UV sequence [frames, 2, H, W], got {tuple(uv.shape)}")
    if uv.shape[0] != photos:
        raise DreamPoseError(
            f"{photos} subject photo(s) but {uv.shape[0]} DensePose UV frame(s): give exactly one UV frame per photo, "
            "in the same order (DreamPose Load DensePose UV of the photos' own DensePose, 'count' to trim)")
    return uv.to(device="cpu", dtype=torch.float32).clone().contiguous()


class _Progress:
    """ProgressBar tick every step (also ComfyUI's cancel check), loss as the node's text, Cancel checked."""

    def __init__(self, what: str, total: int):
        self.what, self.bar, self.last_text = what, comfy.utils.ProgressBar(total), 0.0
        context = _executing_context()
        self.node_id = context.node_id if context is not None else None

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.bar.update_absolute(step, total)
        now = time.monotonic()
        if step >= total or now - self.last_text >= TEXT_INTERVAL_S:
            self.last_text = now
            self.text(f"{self.what}: step {step}/{total}, loss {loss:.4f}")
        mm.throw_exception_if_processing_interrupted()

    def text(self, message: str) -> None:
        _send_text(message, self.node_id)


def _executing_context():
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # a host before 0.3.4x
        return None
    return get_executing_context()


def _send_text(message: str, node_id) -> None:
    """The text under the node (0.3.75: PromptServer.send_progress_text); nothing where the host lacks it."""
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(message, node_id)


_KIND_NAMES = {"subject": "a subject (UNet + adapter) finetune", "vae": "a VAE decoder finetune"}


def _target(name: str, kind: str) -> str:
    """Where to save: the first subjects folder. Replacing a finetune of the other kind is refused: the
    two nodes would overwrite each other's file and retrain on every run."""
    dirs = folders.subject_dirs()
    if not dirs:
        raise DreamPoseError("no models/dreampose folder is registered; is the pack installed in custom_nodes?")
    path = os.path.join(dirs[0], name)
    if os.path.isfile(path):
        try:
            existing = read_metadata(path).get("kind")
        except DreamPoseError:
            existing = None  # not ours or damaged: replaced
        if existing in _KIND_NAMES and existing != kind:
            raise DreamPoseError(f"name {name!r}: models/dreampose/subjects/{name} holds {_KIND_NAMES[existing]}; "
                                 f"give this one another name (e.g. {name[:-len('.safetensors')]}_{kind}) so "
                                 "both are kept")
    os.makedirs(dirs[0], exist_ok=True)
    return path


def export_target(kind: str, filename: str, settings: FinetuneSettings) -> str | None:
    """Where the finetune goes for core's own loaders, beside the subject file: a LoRA subject finetune as
    a kohya LoRA in ``models/loras`` (LoraLoaderModelOnly; the adapter stays in the subject file), a VAE
    decoder finetune as the whole VAE in ldm keys in ``models/vae`` (VAELoader). None for a full subject
    finetune: the whole UNet changed, there is no small file to give core. Checked before training."""
    if kind == "subject":
        return folders.export_path("loras", filename, "lora_export") if settings.lora_rank else None
    return folders.export_path("vae", filename, "vae_export")


def export_for_core(kind: str, path: str | None, result, new) -> str | None:
    """Write the export (:func:`export_target`) atomically; skipped when the file there already holds
    this very finetune (same cache key)."""
    if path is None:
        return None
    if kind == "subject":
        delta = lora_delta_of(result.model)
        if delta is None:
            raise DreamPoseError(f"{result.path}: a LoRA finetune without its LoRA delta; train it again")
        what, tensors = "lora_export", kohya_state(delta)
        extra = {"ss_network_dim": str(delta.rank), "ss_network_alpha": str(delta.alpha)}
    else:
        what, extra = "vae_export", {}
        tensors = {k: v.detach().contiguous() for k, v in new.vae.first_stage_model.state_dict().items()}
    if os.path.isfile(path) and read_metadata(path).get("cache_key") == result.cache_key:
        return path
    atomic_save_safetensors(tensors, path, {**format_metadata(kind=what, subject=os.path.basename(result.path),
                                                              cache_key=result.cache_key), **extra})
    return path


_SEED_TOOLTIP = ("Seed of the {what}: the same seed and settings reproduce the finetune and find the saved one. No "
                 "randomize control: a new seed means training again.")


class _FinetuneNode(io.ComfyNode):
    """What SubjectFinetune and VAEDecoderFinetune share: their inputs (in the saved-workflow order,
    defaults from the settings), output and run. A subclass names its kind and its texts; its own
    ``define_schema`` keeps the literal ``node_id`` the registry and the Manager read from the source."""

    KIND = "subject"
    WHAT = "subject finetune"
    TEXTS: dict = {}

    @classmethod
    def inputs(cls) -> list:
        d, t = finetune_defaults(cls.KIND), cls.TEXTS
        inputs = [DreamPoseModelType.Input("model", tooltip=t["model"]),
                  io.Image.Input("images", tooltip=t["images"])]
        if cls.KIND == "subject":
            inputs.append(DreamPosePoseType.Input(
                "poses", tooltip="The photos' own DensePose: the raw UV sequence from 'DreamPose Load DensePose UV', "
                                 "one frame per photo in the same order (not DensePoseWindow5's windows)."))
        inputs += [
            io.String.Input("name", default=t["name_default"], tooltip=t["name"]),
            io.Int.Input("steps", default=d.steps, min=1, max=100_000, tooltip=t["steps"]),
            io.Float.Input("lr", default=d.lr, min=1e-8, max=1e-2, step=1e-6, round=1e-8, tooltip=t["lr"]),
            io.Int.Input("seed", default=d.seed, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                         tooltip=_SEED_TOOLTIP.format(what=t["seed_of"])),
            io.Boolean.Input("crop", default=d.crop, tooltip=t["crop"]),
            io.Boolean.Input("flip", default=d.flip, tooltip=t["flip"]),
        ]
        precision = io.Combo.Input("precision", options=list(PRECISIONS), default=d.precision,
                                   tooltip="Training arithmetic: fp32 (safest), bf16 (Ampere or newer; less VRAM) or "
                                           "fp16 (mixed precision with loss scaling).")
        if cls.KIND != "subject":
            return inputs + [
                precision,
                io.Combo.Input("decoder_loss", options=list(DECODER_LOSSES), default=d.decoder_loss, optional=True,
                               tooltip="Reconstruction loss: mse (the authors') or l1, which paints less of a rim of "
                                       "body colour around poses unlike the photos' (the demo uses l1)."),
                io.Float.Input("decoder_blend", default=d.decoder_blend, min=0.01, max=1.0, step=0.05, round=0.01,
                               optional=True,
                               tooltip="Share of the finetune's weight change kept (decoder = base + blend × change). "
                                       "1: all of it (the authors'); lower stays nearer the base decoder on new "
                                       "poses at some cost in sharpness (the demo uses 0.6)."),
            ]
        return inputs + [
            io.Boolean.Input("gradient_checkpointing", default=d.gradient_checkpointing,
                             tooltip="Recompute activations in the backward pass: much less VRAM, about 30% slower."),
            precision,
            io.Combo.Input("optimizer", options=list(OPTIMIZERS), default=d.optimizer,
                           tooltip="adamw, or adamw8bit (bitsandbytes, CUDA only: optimizer state in 8 bit, about a "
                                   "quarter of AdamW's memory)."),
            io.Int.Input("lora_rank", default=d.lora_rank, min=0, max=512,
                         tooltip="0: finetune every UNet and adapter weight (the paper; about 32 GB of VRAM at "
                                 "512×640). Default 16: LoRA layers instead, a fraction of the memory and "
                                 "a small file (the fast preset)."),
        ]

    @classmethod
    def outputs(cls) -> list:
        outputs = [DreamPoseModelType.Output(display_name="model", tooltip=cls.TEXTS["output"])]
        if cls.KIND == "vae":
            outputs.append(io.Vae.Output(display_name="VAE", tooltip="The finetuned VAE as a core VAE (VAE Decode); "
                                                                     "also saved to models/vae/<name>.safetensors."))
        return outputs

    @classmethod
    def validate_inputs(cls, name: str | None = None) -> bool | str:
        return _validate_name(name)

    @classmethod
    def run_finetune(cls, model, images, name: str, poses=None, **training) -> io.NodeOutput:
        """The shared body: photos (and poses) in, the finetuned model out, on the offload device."""
        filename = check_name(name)
        model = require_model(model)
        kind = cls.KIND
        with torch.inference_mode(False):
            photos = photos_from_images(images)
            uv = subject_poses(poses, photos.shape[0]) if kind == "subject" else None
            settings = FinetuneSettings(**{**finetune_defaults(kind).to_dict(), **training})
            path = _target(filename, kind)
            export = export_target(kind, filename, settings)
            progress = _Progress(cls.WHAT, settings.steps)
            # The library trains diffusers networks: a view of the core weights (no copy), taken with the
            # network wholly back on its offload device so the view holds no VRAM.
            # (The weights are inference tensors, made while ComfyUI ran the loader: viewed in inference mode.)
            if kind == "subject":
                dev.unload(model.unet)
                with torch.inference_mode():
                    lib = model.view(unet=native.diffusers_unet(model.unet, model.unet_config))
                # CLIP and the VAE encode the photos (the VAE every step); UNet and adapter are copied to the device
                frozen = [model.clip_vision.patcher, model.vae.patcher]
            else:
                dev.unload(model.vae.patcher)
                with torch.inference_mode():
                    lib = model.view(vae=native.diffusers_vae(model.vae, model.vae_config))
                frozen = []     # the whole VAE is copied to the device: nothing of the input model moves
            # a finetune this pack saved under that name is replaced (ComfyUI reruns); any other file never
            result = finetune_to_file(kind, lib, photos, uv, settings, path, callback=progress, base=None,
                                      overwrite=holds_finetune(path, kind),
                                      search_folders=folders.subject_dirs(),
                                      borrow=lambda: dev.borrowed([], TRAINING_MEMORY, owner=model, core=frozen))
            new = model.replace(result.model, unet=kind == "subject", vae=kind == "vae")
            exported = export_for_core(kind, export, result, new)
        saved = os.path.basename(result.path)
        if result.cached:
            log.info("DreamPose %s: %s has the same model, photos and settings; loading it, 0 steps trained",
                     cls.WHAT, result.path)
            progress.text(f"{cls.WHAT}: reused {saved} (same model, photos and settings), 0 steps trained")
        else:
            log.info("DreamPose %s: %d steps trained, saved %s", cls.WHAT, result.steps_trained, result.path)
            progress.text(f"{cls.WHAT}: {result.steps_trained} steps trained, saved subjects/{saved}")
        if exported:
            log.info("DreamPose %s: core loaders read %s", cls.WHAT, exported)
        return io.NodeOutput(new) if kind == "subject" else io.NodeOutput(new, new.vae)


class SubjectFinetune(_FinetuneNode):
    KIND, WHAT = "subject", "subject finetune"
    TEXTS = {
        "model": "The DreamPose model to finetune (from Load DreamPose).",
        "images": "Photos of the subject, an IMAGE batch (one photo works; a few views are better), full body, RGB.",
        "name_default": "subject",
        "name": "File name under models/dreampose/subjects/ (.safetensors is added); no folders. An existing file "
                "of that name is replaced. Give the VAE finetune another name.",
        "steps": f"Training steps (default: the fast preset's; the authors used {FinetuneSettings.steps}).",
        "lr": "Learning rate (AdamW). 1e-4 with the default LoRA; the authors' full finetune used 1e-5.",
        "seed_of": "noise, timesteps and augmentation",
        "crop": "Random crops of photo and pose together (augmentation; helps with few photos).",
        "flip": "Random horizontal flips of photo and pose together. Off by default: a mirrored DensePose keeps "
                "each limb's own U/V, and an asymmetric garment would be learnt both ways round.",
        "output": "A new DreamPose model with the finetuned UNet and adapter (the input model is not changed).",
    }

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SubjectFinetune",
            display_name="DreamPose Subject Finetune",
            category="DreamPose/finetune",
            description=(
                "Finetunes the UNet and the CLIP-VAE adapter on photos of one subject, each with its own DensePose, "
                "so the animation keeps the person's face and garment (the paper's second stage). Image and pose are "
                "augmented together. Saved to models/dreampose/subjects/<name>.safetensors; when a finetune with the "
                "same model, photos, poses and settings is already saved, it is loaded and nothing is trained. "
                "Outputs a new model; the input model is unchanged. Cancel stops within one step and saves nothing."),
            inputs=cls.inputs(), outputs=cls.outputs())

    @classmethod
    def execute(cls, model, images, poses, name: str, steps: int, lr: float, seed: int, crop: bool, flip: bool,
                gradient_checkpointing: bool, precision: str, optimizer: str, lora_rank: int) -> io.NodeOutput:
        return cls.run_finetune(model, images, name, poses=poses, steps=steps, lr=lr, seed=seed, crop=crop,
                                flip=flip, gradient_checkpointing=gradient_checkpointing, precision=precision,
                                optimizer=optimizer, lora_rank=lora_rank)


class VAEDecoderFinetune(_FinetuneNode):
    KIND, WHAT = "vae", "VAE decoder finetune"
    TEXTS = {
        "model": "The DreamPose model (usually SubjectFinetune's output).",
        "images": "Photos of the subject, an IMAGE batch, RGB (the same as for SubjectFinetune).",
        "name_default": "subject_vae",
        "name": "File name under models/dreampose/subjects/ (.safetensors is added); no folders. Not the subject "
                "finetune's name, or it would replace that file.",
        "steps": "Training steps (default: the fast preset's 100; the authors used 1500).",
        "lr": "Learning rate (AdamW; the authors used 5e-5).",
        "seed_of": "crops, flips, photo order and latent samples",
        "crop": "Random crops of the photos (augmentation).",
        "flip": "Random horizontal flips of the photos.",
        "output": "A new DreamPose model with the finetuned VAE decoder (the input model is not changed).",
    }

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAEDecoderFinetune",
            display_name="DreamPose VAE Decoder Finetune",
            category="DreamPose/finetune",
            description=(
                "Finetunes the VAE decoder on the subject photos (reconstruction), which sharpens the face and the "
                "garment's texture in the decoded frames (the paper's last stage). The encoder is unchanged. Saved to "
                "models/dreampose/subjects/<name>.safetensors and reused like SubjectFinetune's. Outputs a new model; "
                "the input model is unchanged. Cancel stops within one step and saves nothing."),
            inputs=cls.inputs(), outputs=cls.outputs())

    @classmethod
    def execute(cls, model, images, name: str, steps: int, lr: float, seed: int, crop: bool, flip: bool,
                precision: str, decoder_loss: str = "mse", decoder_blend: float = 1.0) -> io.NodeOutput:
        return cls.run_finetune(model, images, name, steps=steps, lr=lr, seed=seed, crop=crop, flip=flip,
                                precision=precision, decoder_loss=decoder_loss, decoder_blend=decoder_blend)
