"""Reading and writing weight files safely: safetensors, or pickles restricted to plain tensors.

Every ``.pth``/``.ckpt``/``.bin`` goes through ``torch.load(weights_only=True)``: a file whose
unpickling would build arbitrary objects (and so could run code) is refused before anything in it
runs. Key clean-ups needed by the authors' released files live here too: the DDP ``module.``
prefix and the VAE attention names of diffusers < 0.17. Writes are atomic (temp file, then rename).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import DreamPoseError

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
FORMAT_NAME = "dreampose"
FORMAT_VERSION = "1"

_OLD_VAE_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def require_file(path: str, what: str) -> str:
    if not path or not os.path.isfile(path):
        raise DreamPoseError(f"{what} not found: {path!r}")
    return path


def read_state_dict(path: str, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or (weights-only) pickle file; ldm ``state_dict`` wrappers unwrapped."""
    require_file(path, what)
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    if not lower.endswith(PICKLE_SUFFIXES):
        raise DreamPoseError(f"{path}: unknown weights format; expected .safetensors, .pth, .pt, .ckpt or .bin")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise DreamPoseError(
            f"{path}: refused to load. It is not a plain tensor checkpoint, and unpickling it could run code "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Only load weight files you trust, "
            "converted to .safetensors") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise DreamPoseError(f"{path}: expected a dict of tensors (a state_dict), got {type(data).__name__}")
    return data


def read_metadata(path: str) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other formats)."""
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        return {}
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


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


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> str:
    """Write safetensors to a temp name beside ``path`` and rename: no half-written file on a crash."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def format_metadata(**fields) -> dict[str, str]:
    """Our file header: format, version and the given fields (dicts/lists as JSON)."""
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    for k, v in fields.items():
        if v is not None:
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta
