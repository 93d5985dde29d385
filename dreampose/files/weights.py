"""Reading weight files safely: safetensors, or pickles restricted to plain tensors.

Every ``.pth``/``.ckpt``/``.bin`` goes through ``torch.load(weights_only=True)``: a file whose
unpickling would build arbitrary objects (and so could run code) is refused before anything in it
runs. Key clean-ups needed by the authors' released files live here too: the DDP ``module.``
prefix, the VAE attention names of diffusers < 0.17 and the two CLIP key layouts. Our metadata
header (``format_metadata``, ``metadata_json``) is written and read here too; writing files is
:mod:`dreampose.files.atomic`.

``peek_keys`` lists a file's tensor names without reading the tensors and ``guess_kind`` says which
model those names belong to, so a file given for the wrong input is refused, with what it *is*,
before any weights are loaded. Every failure to read a file is a DreamPoseError naming it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile

import torch
from safetensors import safe_open

from ..errors import DreamPoseError
from .paths import require_path

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
FORMAT_NAME = "dreampose"
FORMAT_VERSION = "1"

CLIP_PREFIXES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_OLD_VAE_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(SAFETENSORS_SUFFIXES)


def _check_suffix(path: str) -> None:
    if not is_safetensors(path) and not path.lower().endswith(PICKLE_SUFFIXES):
        raise DreamPoseError(f"{path}: unknown weights format; expected .safetensors, .pth, .pt, .ckpt or .bin")


def _open_safetensors(path: str):
    """``safe_open`` with a readable error: a corrupt or mislabelled file raises Rust's SafetensorError."""
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # SafetensorError is not importable under one stable name across versions
        raise DreamPoseError(f"{path}: not a valid .safetensors file ({str(exc)[:200]}); is it truncated, or "
                             "another format renamed?") from exc


def _torch_load(path: str, mmap: bool = False):
    """``torch.load(weights_only=True)``; every failure becomes a DreamPoseError.

    A pickle that would build anything but tensors (and so could run code) is refused by torch's
    restricted unpickler before any of it runs. A corrupt file raises a zoo of exceptions
    (EOFError for an empty file, KeyError for random bytes, RuntimeError for a cut zip): all
    are reported the same way, as an unreadable file rather than a crash.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = (str(exc).splitlines() or [""])[0]
        if "weights only" in first.lower():
            raise DreamPoseError(
                f"{path}: refused to load. It holds Python objects other than tensors, and unpickling it could "
                "run code. Only load weight files you trust, converted to .safetensors") from exc
        raise DreamPoseError(f"{path}: not a readable PyTorch weights file ({first[:200]})") from exc
    except (EOFError, KeyError, ValueError, RuntimeError, AttributeError, TypeError, IndexError) as exc:
        reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise DreamPoseError(f"{path}: not a readable PyTorch weights file (empty, truncated or another "
                             f"format: {reason})") from exc


def _unwrap(data, path: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded pickle (ldm checkpoints nest it under ``state_dict``)."""
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise DreamPoseError(f"{path}: expected a dict of tensors (a state_dict), got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DreamPoseError(f"{path}: expected a dict of tensors (a state_dict); {len(bad)} entries are not "
                             f"tensors (e.g. {bad[0]!r}: {type(data[bad[0]]).__name__})")
    return data


def read_state_dict(path: str, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or (weights-only) pickle file; ldm ``state_dict`` wrappers unwrapped."""
    require_path(path, what, file=True)
    _check_suffix(path)
    if is_safetensors(path):
        with _open_safetensors(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    return _unwrap(_torch_load(path), path)


def peek_keys(path: str) -> list[str] | None:
    """The tensor names of a weights file without reading the tensors, or None where that is not cheap.

    safetensors: the JSON header. Zip pickles (``torch.save`` since 1.6): unpickled with ``mmap`` so
    storages stay on disk; still weights-only, so a malicious file is refused here already. Legacy
    (non-zip) pickles cannot be read lazily: None, and the full load checks them later.
    """
    require_path(path, "weights file", file=True)
    _check_suffix(path)
    if os.path.getsize(path) == 0:
        raise DreamPoseError(f"{path}: the file is empty (0 bytes), so the download or copy did not finish; "
                             "fetch it again")
    if is_safetensors(path):
        with _open_safetensors(path) as f:
            return list(f.keys())
    if not zipfile.is_zipfile(path):
        return None
    return list(_unwrap(_torch_load(path, mmap=True), path))


def read_metadata(path: str) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other formats)."""
    if not is_safetensors(path):
        return {}
    require_path(path, "weights file", file=True)
    with _open_safetensors(path) as f:
        return dict(f.metadata() or {})


def guess_kind(keys) -> str:
    """Which model a state dict's names belong to, for error messages that say what a wrong file *is*.

    Returns ``dreampose``, ``sd_checkpoint``, ``unet``, ``adapter``, ``vae``, ``clip``, or ``unknown``;
    a leading ``module.`` is ignored.
    """
    names = {k[len("module."):] if k.startswith("module.") else k for k in keys}

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in names)

    if has("unet.") and has("adapter."):
        return "dreampose"
    if has("model.diffusion_model."):
        return "sd_checkpoint"
    if "vae2clip.weight" in names:
        return "adapter"
    if "conv_in.weight" in names and has("down_blocks.", "input_blocks."):
        return "unet"
    if has("vision_model.", "text_model.", "embeddings.patch_embedding."):  # before "encoder.": bare CLIP has it
        return "clip"
    if has("encoder.", "decoder.", "first_stage_model.", "quant_conv."):
        return "vae"
    return "unknown"


KIND_NAMES = {
    "dreampose": "a DreamPose file in our format", "sd_checkpoint": "a full Stable Diffusion checkpoint",
    "unet": "a diffusers UNet state dict", "adapter": "a DreamPose adapter (adapter_N.pth)",
    "vae": "a VAE", "clip": "a CLIP model", "unknown": "an unrecognised set of weights",
}


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading DDP ``module.`` (only the prefix: inner names may contain "module.")."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def modernise_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAE attention ``query/key/value/proj_attn`` (diffusers < 0.17) → ``to_q/to_k/to_v/to_out.0``."""
    out = {}
    for k, v in state.items():
        m = _OLD_VAE_ATTENTION.match(k)
        out[f"{m.group(1)}{_NEW_NAME[m.group(2)]}.{m.group(3)}" if m else k] = v
    return out


def split_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def normalise_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare CLIP vision keys (``embeddings.*`` …) from either layout; text tower and projection dropped."""
    out = {}
    for k, v in state.items():
        k = k[len("vision_model."):] if k.startswith("vision_model.") else k
        if k.startswith(CLIP_PREFIXES) and not k.endswith("position_ids"):
            out[k] = v
    return out


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def format_metadata(**fields) -> dict[str, str]:
    """Our file header: format, version and the given fields (dicts/lists as JSON; values JSON cannot
    hold, such as dtypes, as their text)."""
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    for k, v in fields.items():
        if v is not None:
            meta[k] = v if isinstance(v, str) else json.dumps(v, default=_jsonable)
    return meta


def holds_finetune(path: str, kind: str) -> bool:
    """``path`` is one of our subject finetune files of ``kind`` (``subject`` or ``vae``): a file a
    finetune command may reuse or, when it is stale, replace."""
    try:
        meta = read_metadata(path)
    except DreamPoseError:
        return False
    return is_ours(meta) and meta.get("kind") == kind and "cache_key" in meta


def is_ours(meta: dict[str, str]) -> bool:
    """Whether a safetensors header is one of ours (``format: dreampose``)."""
    return meta.get("format") == FORMAT_NAME


def metadata_json(meta: dict[str, str], key: str, source: str, default=None):
    """A JSON field of our metadata (``default`` when absent); a damaged one names the file and field."""
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except ValueError as exc:
        raise DreamPoseError(f"{source}: damaged metadata field {key!r} ({exc})") from exc
