"""DreamPose's networks as ComfyUI core objects: the UNet as a core ``MODEL``, CLIP ViT-B/32 as a core
``CLIP_VISION``, the VAE as a core ``VAE``.

Core then does what it does for every model: device placement and partial loading (``--lowvram``),
dtype rules and fp8 weight storage, attention backends, LoRA and other model patches, samplers,
schedulers, previews. The conversion is exact (tested against the library to ≤1e-5 in fp32):

* UNet: our diffusers-key weights are renamed to ldm keys with core's own map
  (``comfy.utils.unet_to_diffusers``), core's ldm UNet config is detected from them (on a copy whose
  ``conv_in`` is cut to the 4 latent channels, which core knows) and widened to 14 input channels,
  and :class:`DreamPoseSD15` builds a plain :class:`comfy.model_base.BaseModel`: no inpaint concat,
  the 10 pose channels arrive as ``c_concat`` from a conditioning's ``noise_concat``.
* CLIP: core's generic ``CLIPVisionModelProjection`` with the model's own config (core's loader
  does not know ViT-B/32). The library's pixel arithmetic stays the library's (PIL bicubic resize and
  centre crop, as the authors); only the transformer runs in core.
* VAE: ``comfy.sd.VAE`` from the diffusers state dict with an ldm config derived from ours.

:class:`ClipView` and :class:`VAEView` let the library's own conditioning code
(``dreampose.pipeline.conditioning``) run on the core networks: the method is not written twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import comfy.clip_model
import comfy.clip_vision
import comfy.model_base
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models
import comfy.utils
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ..dreampose.configs import clean_config
from ..dreampose.errors import DreamPoseError
from ..dreampose.loaders.components import instantiate
from ..dreampose.models.bundle import DreamPoseModel
from ..dreampose.pipeline.images import CLIP_MEAN, CLIP_STD
from ..dreampose.settings import LATENT_CHANNELS, UNET_IN_CHANNELS


class DreamPoseSD15(comfy.supported_models.SD15):
    """SD 1.x with DreamPose's 14 input channels. Core would treat ``in_channels > 4`` as an inpaint
    model and build an inpaint concat; DreamPose's extra channels are the pose windows instead, given
    per cond as ``noise_concat``. Never added to core's list of detectable models."""

    def inpaint_model(self) -> bool:
        return False

    def get_model(self, state_dict, prefix="", device=None):
        return DreamPoseUNet(self, model_type=self.model_type(state_dict, prefix), device=device)


class DreamPoseUNet(comfy.model_base.BaseModel):
    """Core's SD model with the pose windows checked where core turns them into the UNet's extra
    channels: core would repeat or cut a ``noise_concat`` whose batch is not the latent's without a
    word (frames would get other frames' poses), and a cond without one would crash in ``conv_in``."""

    def extra_conds(self, **kwargs):
        pose, noise = kwargs.get("noise_concat"), kwargs.get("noise")
        if pose is None:
            raise DreamPoseError("a conditioning reached the DreamPose UNet without pose windows: pass the image "
                                 "conditioning through DreamPose Apply Pose (it adds them) before the sampler")
        if noise is not None:
            check_pose_batch(pose, noise.shape[0], tuple(noise.shape[-2:]))
        return super().extra_conds(**kwargs)


def check_pose_batch(pose: torch.Tensor, frames: int, size: tuple[int, int]) -> None:
    """One pose window per latent frame (or one for all), in DreamPose's 10 channels at the latent's
    size ``(h, w)``, else a clear error."""
    if pose.ndim != 4 or pose.shape[1] != UNET_IN_CHANNELS - LATENT_CHANNELS:
        raise DreamPoseError(f"pose windows must be [frames, {UNET_IN_CHANNELS - LATENT_CHANNELS}, h, w], got "
                             f"{tuple(pose.shape)}")
    if pose.shape[0] not in (1, frames):
        raise DreamPoseError(f"{pose.shape[0]} pose window(s) for a latent batch of {frames}: every frame needs its "
                             "own window. Build the latent and the conditionings with the same DreamPose Apply Pose "
                             "(its LATENT has one frame per pose)")
    if tuple(pose.shape[-2:]) != tuple(size):
        raise DreamPoseError(f"the pose windows are {pose.shape[-1] * 8}×{pose.shape[-2] * 8} (W×H) but the latent "
                             f"is {size[1] * 8}×{size[0] * 8}: build both at the same size (DensePoseWindow5's width "
                             "and height)")


CORE_NORM_GROUPS = 32   # core's UNet and VAE code build every GroupNorm with 32 groups


def _check_groups(config: dict, what: str) -> None:
    groups = config.get("norm_num_groups", CORE_NORM_GROUPS)
    if groups != CORE_NORM_GROUPS:
        raise DreamPoseError(f"the {what} normalises in {groups} groups; ComfyUI's {what} code computes "
                             f"{CORE_NORM_GROUPS} (as every Stable Diffusion 1.x model has), so it would give other "
                             "numbers: use a model with 32-group norms")


def core_unet_layout(config: dict) -> dict:
    """Core's description of a diffusers UNet's blocks (what ``comfy.utils.unet_to_diffusers`` needs)."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    base = config["block_out_channels"][0]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    return {
        "num_res_blocks": [per_level] * levels,
        "channel_mult": [c // base for c in config["block_out_channels"]],
        "transformer_depth": [int(a) for a in down_attn for _ in range(per_level)],
        # read from the end while the up blocks are built from the deepest level: shallow → deep
        "transformer_depth_output": [int(up_attn[levels - 1 - level]) for level in range(levels)
                                     for _ in range(per_level + 1)],
        "transformer_depth_middle": 1,
    }


def ldm_unet_state(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Our (diffusers-key) UNet weights under core's ldm names; the same tensors, not copies."""
    keymap = comfy.utils.unet_to_diffusers(core_unet_layout(config))
    unknown = sorted(set(state) - set(keymap))
    if unknown:
        raise DreamPoseError(f"the UNet has weights core does not know how to place (e.g. {unknown[:3]}): it is not "
                             "a Stable Diffusion 1.x UNet")
    return {keymap[k]: v for k, v in state.items()}


def _model_config(ldm: dict[str, torch.Tensor]) -> DreamPoseSD15:
    """Core's model config for our weights, detected as SD 1.x would be and widened to 14 channels."""
    conv_in = ldm["input_blocks.0.0.weight"]
    if conv_in.shape[1] != UNET_IN_CHANNELS:
        raise DreamPoseError(f"the UNet takes {conv_in.shape[1]} input channels, DreamPose needs {UNET_IN_CHANNELS}")
    probe = dict(ldm)
    probe["input_blocks.0.0.weight"] = conv_in[:, :LATENT_CHANNELS]   # a view: what core detects as SD 1.x
    unet_config = comfy.model_detection.detect_unet_config(probe, "")
    if unet_config is None:
        raise DreamPoseError("core does not recognise the UNet (not Stable Diffusion 1.x shaped)")
    unet_config["in_channels"] = UNET_IN_CHANNELS
    return DreamPoseSD15(unet_config)


def core_unet(unet, dtype: torch.dtype | None = None, manual_cast_dtype: torch.dtype | None = None,
              fp8_optimizations: bool = False) -> comfy.model_patcher.ModelPatcher:
    """The DreamPose UNet (a diffusers ``UNet2DConditionModel``) as a core MODEL.

    Args:
        unet: the 14-channel UNet; its weights are copied into core's layers.
        dtype: the weights' storage dtype in core (default: the UNet's own); fp8 types store weights
            in 8 bits and compute in ``manual_cast_dtype``.
        manual_cast_dtype: the compute dtype when it differs from the storage dtype (core's rule:
            ``mm.unet_manual_cast``), or None.
        fp8_optimizations: core's fp8 matrix-multiply path (``--fast``-style) for fp8 weights.

    Returns:
        A ``ModelPatcher`` on the offload device; core loads it (partially, when memory is short)
        whenever it samples.
    """
    config = clean_config(unet.config)
    _check_groups(config, "UNet")
    ldm = ldm_unet_state(unet.state_dict(), config)
    model_config = _model_config(ldm)
    weight_dtype = dtype or next(unet.parameters()).dtype
    model_config.set_inference_dtype(weight_dtype, manual_cast_dtype)
    if fp8_optimizations:
        model_config.optimizations["fp8"] = True
    offload = mm.unet_offload_device()
    model = model_config.get_model(ldm, "").to(offload)
    model.load_model_weights(dict(ldm), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=offload)


# ------------------------------------------------------------------------------------------ CLIP

_CLIP_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "hidden_act", "num_channels", "layer_norm_eps")


class DreamPoseClipVision(comfy.clip_vision.ClipVisionModel):
    """Core's CLIP vision wrapper (model management, ``encode_image``) around any CLIP vision config,
    ViT-B/32 included, in a dtype of our choice: core's loader only recognises the larger towers and
    would run ours in fp16, which moves the tokens by ~1e-3."""

    def __init__(self, config: dict, dtype: torch.dtype):
        self.image_size = config.get("image_size", 224)
        self.image_mean = config.get("image_mean", list(CLIP_MEAN))
        self.image_std = config.get("image_std", list(CLIP_STD))
        self.return_all_hidden_states = False
        self.load_device = mm.text_encoder_device()
        offload = mm.text_encoder_offload_device()
        self.dtype = dtype
        self.model = comfy.clip_model.CLIPVisionModelProjection(config, dtype, offload, comfy.ops.manual_cast).eval()
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=self.load_device,
                                                        offload_device=offload)


def core_clip_vision(clip, dtype: torch.dtype = torch.float32) -> DreamPoseClipVision:
    """A transformers ``CLIPVisionModel`` as a core CLIP_VISION (every weight placed: checked)."""
    hf = clip.config.to_dict()
    config = {k: hf[k] for k in _CLIP_KEYS if k in hf}
    config.update(model_type="clip_vision_model", num_channels=hf.get("num_channels", 3))
    core = DreamPoseClipVision(config, dtype)
    state = {}
    for k, v in clip.state_dict().items():
        if k.endswith("position_ids"):
            continue
        state[k if k.startswith("vision_model.") else f"vision_model.{k}"] = v
    missing, unexpected = core.load_sd(state)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise DreamPoseError(f"the CLIP vision weights do not fit core's CLIP (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")
    return core


# ------------------------------------------------------------------------------------------ VAE

def ldm_vae_config(config: dict) -> dict:
    """Core's ``AutoencoderKL`` parameters for a diffusers VAE config."""
    channels = list(config["block_out_channels"])
    ddconfig = {"double_z": True, "z_channels": config["latent_channels"], "resolution": config.get("sample_size", 256),
                "in_channels": config["in_channels"], "out_ch": config["out_channels"], "ch": channels[0],
                "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": config["layers_per_block"],
                "attn_resolutions": [], "dropout": 0.0}
    return {"params": {"ddconfig": ddconfig, "embed_dim": config["latent_channels"]}}


def core_vae(vae, dtype: torch.dtype | None = None) -> comfy.sd.VAE:
    """A diffusers ``AutoencoderKL`` as a core VAE (core converts the keys; every weight placed: checked)."""
    _check_groups(clean_config(vae.config), "VAE")
    core = comfy.sd.VAE(sd={k: v for k, v in vae.state_dict().items()}, config=ldm_vae_config(clean_config(vae.config)),
                        dtype=dtype)
    placed = set(core.first_stage_model.state_dict())
    if len(placed) != len(vae.state_dict()):
        raise DreamPoseError("the VAE does not fit core's AutoencoderKL (not a Stable Diffusion 1.x VAE)")
    return core


# ------------------------------------------------------------------------------------------ views

class _HiddenStates:
    def __init__(self, last_hidden_state: torch.Tensor):
        self.last_hidden_state = last_hidden_state


class ClipView(torch.nn.Module):
    """A core CLIP_VISION with the interface the library calls (``clip(pixel_values=…)
    .last_hidden_state`` on pixels the library has already resized, cropped and normalised)."""

    def __init__(self, core: comfy.clip_vision.ClipVisionModel):
        super().__init__()
        self.core = core
        self.net = core.model

    def forward(self, pixel_values: torch.Tensor) -> _HiddenStates:
        mm.load_model_gpu(self.core.patcher)
        p = next(self.net.parameters())
        out = self.net(pixel_values=pixel_values.to(p.device), intermediate_output=-2)
        return _HiddenStates(out[0])


class _Posterior:
    """The VAE posterior the library samples from (diffusers' DiagonalGaussianDistribution's arithmetic)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class _Encoded:
    def __init__(self, moments: torch.Tensor):
        self.latent_dist = _Posterior(moments)


class VAEView(torch.nn.Module):
    """A core VAE with the interface the library calls (``vae.encode(x).latent_dist``, with the
    posterior's moments: core's own ``encode`` returns its mode only, and the authors' conditioning
    latent is a sample: docs/official-code.md, quirk #13)."""

    def __init__(self, core: comfy.sd.VAE):
        super().__init__()
        self.core = core
        self.net = core.first_stage_model

    def encode(self, pixels: torch.Tensor) -> _Encoded:
        # loaded as core's own VAE.encode loads it: its working memory estimated, partially if need be
        mm.load_models_gpu([self.core.patcher], memory_required=self.core.memory_used_encode(pixels.shape,
                                                                                            self.core.vae_dtype),
                           force_full_load=self.core.disable_offload)
        p = next(self.net.parameters())
        x = pixels.to(p.device, p.dtype)
        return _Encoded(self.net.quant_conv(self.net.encoder(x)))


def diffusers_unet(patcher: comfy.model_patcher.ModelPatcher, config: dict):
    """The core MODEL's weights as a diffusers ``UNet2DConditionModel`` sharing their storage (no copy),
    for the library code that needs one (finetuning clones it; nothing keeps it)."""
    keymap = comfy.utils.unet_to_diffusers(core_unet_layout(config))
    ldm = patcher.model.diffusion_model.state_dict()
    state = {k: ldm[v] for k, v in keymap.items() if v in ldm}
    return instantiate(lambda: UNet2DConditionModel.from_config(config), state, "14-channel DreamPose UNet",
                       "the core MODEL")


def diffusers_vae(core: comfy.sd.VAE, config: dict):
    """The core VAE's weights as a diffusers ``AutoencoderKL`` (for the VAE decoder finetune)."""
    state = convert_ldm_vae_checkpoint(core.first_stage_model.state_dict(), config)
    return instantiate(lambda: AutoencoderKL.from_config(config), state, "Stable Diffusion VAE", "the core VAE")


@dataclass
class NativeModel:
    """``DREAMPOSE_MODEL`` on ComfyUI's stack: the core MODEL, CLIP_VISION and VAE, plus what is
    DreamPose's own (the adapter, the conditioning convention, the scheduler config). The library's
    code runs on it through :meth:`view`."""

    unet: comfy.model_patcher.ModelPatcher
    clip_vision: DreamPoseClipVision
    vae: comfy.sd.VAE
    adapter: torch.nn.Module
    convention: str
    scheduler_config: dict
    unet_config: dict               # the diffusers configs, to rebuild networks for training
    vae_config: dict
    info: dict = field(default_factory=dict)

    def view(self, unet=None, vae=None) -> DreamPoseModel:
        """The library's model type over the core networks (CLIP and VAE through views); ``unet``/``vae``
        give diffusers networks where library code needs them (finetuning)."""
        return DreamPoseModel(unet, self.adapter, vae if vae is not None else VAEView(self.vae),
                              ClipView(self.clip_vision), self.convention, dict(self.scheduler_config), dict(self.info))

    @property
    def cross_attention_dim(self) -> int:
        return self.unet_config["cross_attention_dim"]

    @property
    def unet_dtype(self) -> torch.dtype:
        return self.unet.model.model_config.unet_config.get("dtype") or torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the UNet computes in (fp8 weights compute in their manual-cast dtype)."""
        return self.unet.model.manual_cast_dtype or self.unet_dtype

    def replace(self, model: DreamPoseModel, unet=False, vae=False) -> "NativeModel":
        """A new bundle from a library model's finetuned networks: ``unet`` (with its adapter) and/or
        ``vae`` become new core objects in this bundle's dtypes; the rest is shared."""
        changes = {"info": dict(model.info), "adapter": model.adapter}
        if unet:
            changes["unet"] = core_unet(model.unet, self.unet_dtype, self.unet.model.manual_cast_dtype)
        if vae:
            changes["vae"] = core_vae(model.vae, self.vae.vae_dtype)
        return replace(self, **changes)
