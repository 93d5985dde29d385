"""Building the networks from the files users have, offline, with configs shipped in the package.

Sources accepted:
* SD 1.x: a diffusers folder (``unet/``, ``vae/``, ``scheduler/``) or one ldm ``.safetensors``/``.ckpt``.
* CLIP ViT-B/32 vision: a transformers folder or a single file, with ``vision_model.*`` keys
  (hub/transformers 4 layout, also inside a full CLIP model) or bare ``embeddings.*`` keys
  (transformers 5). Missing weights are an error: a half-random CLIP would silently draw garbage.
* DreamPose: the authors' ``unet_epoch_N.pth`` / ``adapter_N.pth`` / ``vae_N.pth``, or our
  safetensors file (``unet.*``, ``adapter.*``, optional ``vae.*`` keys plus configs in metadata).

Modules are built with their parameters on the meta device and the file's tensors assigned, so a
860M-parameter UNet is not randomly initialised only to be overwritten, and an fp16 file stays fp16.
A file that does not fit is reported with what is missing, unexpected or of the wrong shape.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..configs import clean_config, shipped_config
from ..errors import DreamPoseError
from ..files.paths import read_json_config as read_config
from ..files.paths import require_path
from ..files.weights import (KIND_NAMES, guess_kind, modernise_vae_keys, normalise_clip_keys, peek_keys,
                             read_state_dict, strip_module_prefix)
from ..models.adapter import EmbeddingAdapter
from ..models.unet import unet_config_with_pose

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device but buffers for real, in this thread only.

    Building under ``torch.device("meta")`` would also put non-persistent buffers there (CLIP's
    ``position_ids``); they are not in any weights file, so nothing could fill them and the module
    would need a second, randomly initialised build. Parameters are all in the file; buffers are
    small and computed, not learnt, so building them for real is both cheap and correct.
    """
    original = torch.nn.Module.register_parameter
    owner = threading.get_ident()

    def register(module, name, param):
        if param is not None and not param.is_meta and threading.get_ident() == owner:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


# Counts in a config that multiply the number of modules built (SD 1.x: 2 layers per block, 4 blocks; CLIP ViT-B/32:
# 12 layers): a typo of 10**9 there would build modules for hours before any size could be compared with the file.
_LAYER_KEYS = ("layers_per_block", "transformer_layers_per_block", "reverse_transformer_layers_per_block",
               "num_hidden_layers")
_BLOCK_KEYS = ("block_out_channels", "down_block_types", "up_block_types")
MAX_CONFIG_LAYERS = 64
MAX_CONFIG_BLOCKS = 16


def check_config_counts(cfg: dict, what: str, source: str) -> dict:
    """``cfg`` unless its layer or block counts are beyond any real model (checked before building anything)."""
    nested = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else {}
    for key in _LAYER_KEYS:
        for value in (cfg.get(key), nested.get(key)):
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                items = v if isinstance(v, (list, tuple)) else [v]
                if any(isinstance(x, int) and not isinstance(x, bool) and not 0 <= x <= MAX_CONFIG_LAYERS
                       for x in items):
                    raise DreamPoseError(f"{source}: the {what} config has {key} {value!r}; real models have 1 to "
                                         f"{MAX_CONFIG_LAYERS} (Stable Diffusion 1.x: 1 or 2): check the config")
    for key in _BLOCK_KEYS:
        value = cfg.get(key)
        if isinstance(value, (list, tuple)) and len(value) > MAX_CONFIG_BLOCKS:
            raise DreamPoseError(f"{source}: the {what} config has {len(value)} {key}; real models have at most "
                                 f"{MAX_CONFIG_BLOCKS} (Stable Diffusion 1.x: 4): check the config")
    return cfg


def _fit_report(expected: dict, state: dict) -> list[str]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(expected)} weights missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with the wrong shape (e.g. {k}: file {tuple(state[k].shape)}, "
                     f"model {tuple(expected[k].shape)})")
    return parts


def _meta_state(build: Callable[[], torch.nn.Module], what: str, source: str) -> dict | None:
    """The state dict (meta tensors: shapes only) of the module ``build`` makes, built wholly on the meta device.

    None where a module cannot be built there (the real build then reports what it reports)."""
    try:
        with torch.device("meta"):
            return build().state_dict()
    except (TypeError, ValueError, KeyError) as exc:
        raise DreamPoseError(f"{source}: its config does not describe a {what} ({str(exc)[:200]})") from exc
    except (RuntimeError, NotImplementedError):
        return None


def _human_count(n: int) -> str:
    for unit, size in (("T", 10 ** 12), ("G", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _refuse_misfit(expected: dict, state: dict, what: str, source: str) -> None:
    parts = _fit_report(expected, state)
    if not parts:
        return
    want = sum(t.numel() for t in expected.values())
    have = sum(t.numel() for t in state.values())
    sizes = f" (its config describes {_human_count(want)} weights, the file holds {_human_count(have)})" \
        if want > 2 * have or have > 2 * want else ""
    raise DreamPoseError(f"{source}: does not fit a {what}{sizes}: " + "; ".join(parts) +
                         ". Check that the file is the right model for this input, and the config if you gave one.")


def instantiate(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], what: str,
                source: str) -> torch.nn.Module:
    """Build a module without random init and load ``state`` strictly, with a readable error.

    The file's tensors become the parameters (``assign``): no copy, and their dtype is kept, so an fp16 file gives
    an fp16 module. A mismatch is reported before anything is assigned.

    Args:
        build: makes the module; it runs with parameters created on the meta device (buffers for real).
        state: every tensor of the module's state dict, under its names.
        what: the module's name in error messages (e.g. ``"Stable Diffusion VAE"``).
        source: where ``state`` came from (usually a path), named in error messages.

    Returns:
        The module holding the tensors of ``state``, in eval mode without gradients.

    Raises:
        DreamPoseError: ``build`` rejects its config, or ``state`` does not fit the module (the message says what
            is missing, unexpected or of the wrong shape).
    """
    # first entirely on the meta device (no memory): a config whose sizes do not match the file (say channels
    # of 200000, hundreds of GB) is refused before a single real tensor is made for it
    expected = _meta_state(build, what, source)
    if expected is not None:
        _refuse_misfit(expected, state, what, source)
    try:
        with _parameters_on_meta():
            module = build()
    except (TypeError, ValueError, KeyError) as exc:  # a config for another model: diffusers' words are cryptic
        raise DreamPoseError(f"{source}: its config does not describe a {what} ({str(exc)[:200]})") from exc
    _refuse_misfit(module.state_dict(), state, what, source)
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # cannot happen for a strict load of persistent weights; never hand out a hollow module
        raise RuntimeError(f"{what} from {source}: tensors left without data after loading: {left[:3]}")
    return module.eval().requires_grad_(False)


def looks_like(keys) -> str:
    """Words for what a state dict seems to be, with the fix when it is a known other model."""
    kind = guess_kind(keys)
    hint = {"sd_checkpoint": " (give it as the Stable Diffusion base model)",
            "dreampose": " (give it as the DreamPose weights)", "vae": " (give it as the VAE)"}.get(kind, "")
    return KIND_NAMES[kind] + hint


def _folder_weights(folder: str) -> str:
    for name in WEIGHT_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise DreamPoseError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_NAMES)})")


def _config_class(folder: str) -> str | None:
    """The class a folder's config.json is for: diffusers' ``_class_name``, transformers' ``model_type``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    cfg = read_config(path)
    return str(cfg.get("_class_name") or cfg.get("model_type") or "")


def _subfolder(path: str, sub: str, class_name: str) -> str:
    """``path/sub`` for a diffusers pipeline folder, ``path`` for a component folder.

    The config must be for ``class_name``: a CLIP or UNet folder given as a VAE has a config.json
    too, and building from the wrong config fails deep inside diffusers with an unrelated message.
    """
    found = [(folder, _config_class(folder)) for folder in (os.path.join(path, sub), path)]
    for folder, cls in found:
        if cls in (class_name, ""):  # "" = a hand-written config without a class name
            return folder
    others = ", ".join(f"{os.path.relpath(os.path.join(f, 'config.json'), path)} is for {c}"
                       for f, c in found if c is not None)
    raise DreamPoseError(f"{path}: not a diffusers folder with a {class_name} (no {sub}/config.json for it"
                         f"{'; found ' + others if others else ''}); give the Stable Diffusion 1.x folder or a "
                         "single .safetensors checkpoint")


def _from_folder(path: str, sub: str, class_name: str, config: dict | None,
                 dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """(config, state dict) of a diffusers component: ``path/sub`` of a pipeline folder, or ``path`` itself."""
    folder = _subfolder(path, sub, class_name)
    return (clean_config(config or read_config(os.path.join(folder, "config.json"))),
            read_state_dict(_folder_weights(folder), dtype=dtype))


def _only(path: str, prefix: str) -> tuple[str, ...] | None:
    """``(prefix,)`` when ``path`` is a single-file checkpoint holding more than that part (read only it)."""
    keys = peek_keys(path)
    return (prefix,) if keys and any(k.startswith(prefix) for k in keys) and \
        not all(k.startswith(prefix) for k in keys) else None


def load_base_unet(path: str, config: dict | None = None, dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """The SD 1.x UNet (4 input channels) from a diffusers folder or an ldm single file.

    Args:
        path: a diffusers pipeline folder (its ``unet/``), a UNet folder, or one ldm ``.safetensors``/``.ckpt``
            checkpoint (its ``model.diffusion_model.*`` weights).
        config: a UNet config to build from instead of the folder's ``config.json`` (for a single file: the
            shipped ``sd15_unet``).
        dtype: the floating dtype to load into, tensor by tensor (None: the file's).

    Returns:
        A ``UNet2DConditionModel`` in eval mode without gradients, in ``dtype`` (or the file's).
    """
    require_path(path, "Stable Diffusion 1.x model")
    if os.path.isdir(path):
        config, state = _from_folder(path, "unet", "UNet2DConditionModel", config, dtype)
    else:
        config = clean_config(config or shipped_config("sd15_unet"))
        raw = read_state_dict(path, "Stable Diffusion 1.x checkpoint", prefixes=_only(path, "model.diffusion_model."),
                              dtype=dtype)
        if not any(k.startswith("model.diffusion_model.") for k in raw):
            raise DreamPoseError(f"{path}: no 'model.diffusion_model.*' weights; this is not a full Stable "
                                 f"Diffusion 1.x checkpoint, it looks like {looks_like(raw)}")
        check_config_counts(config, "Stable Diffusion 1.x UNet", path)
        state = convert_ldm_unet_checkpoint(raw, config)
    check_config_counts(config, "Stable Diffusion 1.x UNet", path)
    return instantiate(lambda: UNet2DConditionModel.from_config(config), state, "Stable Diffusion 1.x UNet", path)


def _is_diffusers_vae(state: dict) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state)


def load_vae(path: str, config: dict | None = None, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """SD 1.x VAE from a diffusers folder, an ldm checkpoint/VAE file, or a diffusers-keyed state dict.

    A diffusers-keyed file is e.g. the authors' ``vae_N.pth``: a leading ``module.`` and the old attention names
    (``query``/``key``/``value``/``proj_attn``) are accepted.

    Args:
        path: a diffusers pipeline folder (its ``vae/``), a VAE folder, or one file.
        config: a VAE config to build from instead of the folder's ``config.json`` (for a single file: the
            shipped ``sd15_vae``).
        dtype: the floating dtype to load into, tensor by tensor (None: the file's).

    Returns:
        An ``AutoencoderKL`` in eval mode without gradients, in ``dtype`` (or the file's).
    """
    require_path(path, "VAE")
    if os.path.isdir(path):
        config, state = _from_folder(path, "vae", "AutoencoderKL", config, dtype)
    else:
        config = clean_config(config or shipped_config("sd15_vae"))
        raw = strip_module_prefix(read_state_dict(path, "VAE file", prefixes=_only(path, "first_stage_model."),
                                                  dtype=dtype))
        if guess_kind(raw) not in ("vae", "sd_checkpoint", "unknown"):
            raise DreamPoseError(f"{path}: not a VAE, it looks like {looks_like(raw)}")
        check_config_counts(config, "Stable Diffusion VAE", path)
        state = raw if _is_diffusers_vae(raw) else convert_ldm_vae_checkpoint(raw, config)
    check_config_counts(config, "Stable Diffusion VAE", path)
    state = modernise_vae_keys(state)
    return instantiate(lambda: AutoencoderKL.from_config(config), state, "Stable Diffusion VAE", path)


@functools.lru_cache(maxsize=None)
def _clip_keys_have_prefix() -> bool:
    """Whether this transformers names CLIPVisionModel weights ``vision_model.*`` (4.x) or bare (5.x)."""
    probe = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, image_size=8, patch_size=8))
    return any(k.startswith("vision_model.") for k in probe.state_dict())


def load_clip_vision(path: str, config: dict | None = None) -> CLIPVisionModel:
    """CLIP vision tower from a folder (``config.json`` + weights) or a single file (ViT-B/32 config).

    The weights may use either key layout (``vision_model.*``, also inside a full CLIP model, or bare
    ``embeddings.*``); they are loaded strictly, so missing weights are an error, not a half-random CLIP.

    Args:
        path: a transformers folder or one weights file.
        config: a CLIP vision (or full CLIP) config to build from instead of the folder's ``config.json``; with
            neither, the shipped ViT-B/32 config (its shapes are still checked strictly against the file).

    Returns:
        A ``CLIPVisionModel`` in eval mode without gradients, in the file's dtype.
    """
    require_path(path, "CLIP vision model")
    folder_config = os.path.join(path, "config.json")
    if os.path.isdir(path):
        weights = _folder_weights(path)
        cfg = config or (read_config(folder_config) if os.path.isfile(folder_config) else None)
    else:
        cfg, weights = config, path
    cfg = cfg or shipped_config("clip_vit_b32_vision")  # shapes are still checked strictly against the file
    return clip_from_state(read_state_dict(weights, "CLIP vision weights"), cfg, weights)


def clip_from_state(raw: dict[str, torch.Tensor], cfg: dict, source: str) -> CLIPVisionModel:
    """A CLIP vision tower from weights in either key layout and its config (strict load)."""
    state = normalise_clip_keys(raw)
    if not any(k.startswith("embeddings.") for k in state):
        raise DreamPoseError(f"{source}: no CLIP vision weights (keys 'vision_model.*' or 'embeddings.*'), it "
                             f"looks like {looks_like(raw)}; give the openai/clip-vit-base-patch32 model")
    check_config_counts(cfg, "CLIP vision model", source)
    if "vision_config" in cfg:  # a full CLIPModel config
        cfg = cfg["vision_config"]
    vision_config = CLIPVisionConfig(**clean_config(cfg))
    if _clip_keys_have_prefix():  # transformers 4 layout
        state = {f"vision_model.{k}": v for k, v in state.items()}
    return instantiate(lambda: CLIPVisionModel(vision_config), state, "CLIP vision model (ViT-B/32)", source)


def load_adapter_state(state: dict[str, torch.Tensor], source: str) -> EmbeddingAdapter:
    state = strip_module_prefix(state)
    if "vae2clip.weight" not in state or "linear1.weight" not in state:
        raise DreamPoseError(f"{source}: not a DreamPose adapter (expected vae2clip.* and linear1.* weights), "
                             f"it looks like {looks_like(state)}")
    width, features = state["vae2clip.weight"].shape
    clip_tokens, total = state["linear1.weight"].shape
    return instantiate(lambda: EmbeddingAdapter(width, clip_tokens, total - clip_tokens, features),
                       state, "DreamPose embedding adapter", source)


def load_authors_unet(path: str, config: dict | None = None, dtype: torch.dtype | None = None
                      ) -> UNet2DConditionModel:
    """``unet_epoch_N.pth``: full 14-channel UNet state dict (``module.`` prefix optional).

    Args:
        path: the authors' UNet file.
        config: an SD 1.x UNet config to build from instead of the shipped ``sd15_unet``; either is widened to 14
            input channels (their saved configs say 4: docs/official-code.md, quirk #3).
        dtype: the floating dtype to load into, tensor by tensor (None: the file's).

    Returns:
        The 14-channel ``UNet2DConditionModel`` in eval mode without gradients, in ``dtype`` (or the file's).
    """
    cfg = check_config_counts(unet_config_with_pose(config or shipped_config("sd15_unet")), "DreamPose UNet", path)
    state = strip_module_prefix(read_state_dict(path, "DreamPose UNet file", dtype=dtype))
    if "conv_in.weight" not in state:
        raise DreamPoseError(f"{path}: not the authors' UNet state dict (no conv_in.weight), it looks like "
                             f"{looks_like(state)}")
    return instantiate(lambda: UNet2DConditionModel.from_config(cfg), state, "14-channel DreamPose UNet", path)


def load_authors_adapter(path: str) -> EmbeddingAdapter:
    """``adapter_N.pth``: the authors' adapter state dict (``vae2clip.*``, ``linear1.*``; ``module.`` optional).

    Its sizes are read from the weights' shapes.

    Returns:
        An ``EmbeddingAdapter`` in eval mode without gradients, in the file's dtype.
    """
    return load_adapter_state(read_state_dict(path, "DreamPose adapter file"), path)


def _builder(module: torch.nn.Module):
    if isinstance(module, EmbeddingAdapter):
        return lambda: EmbeddingAdapter(module.clip_width, module.clip_tokens, module.vae_tokens, module.vae_features)
    if isinstance(module, (UNet2DConditionModel, AutoencoderKL)):
        config = clean_config(dict(module.config))
        return lambda: type(module).from_config(config)
    raise TypeError(f"cannot clone a {type(module).__name__}")


def clone_module(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy with its own storage (ordinary tensors, even from inference-mode ones), built without random init.

    Args:
        module: an ``EmbeddingAdapter``, ``UNet2DConditionModel`` or ``AutoencoderKL`` (any other class is a
            ``TypeError``).
        device: where the copy goes; default: where each tensor is.
        dtype: the dtype of the copy's floating tensors (the others keep theirs); default: theirs.

    Returns:
        The copy, in eval mode without gradients.
    """
    with torch.inference_mode(False):
        state = {}
        for k, v in module.state_dict().items():
            want = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
            state[k] = v.detach().to(device=device if device is not None else v.device, dtype=want, copy=True)
        return instantiate(_builder(module), state, type(module).__name__, "a model in memory")
