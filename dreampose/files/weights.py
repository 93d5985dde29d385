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

import ctypes
import functools
import json
import math
import mmap
import os
import pickle
import re
import sys
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
AUTHORS_UNET = re.compile(r"^unet_epoch_(\d+)\.pth?$")   # the authors' release: unet_epoch_N.pth
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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20


def _wanted(key: str, prefixes) -> bool:
    return prefixes is None or key.startswith(tuple(prefixes))


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors in ``dtype`` (None: as stored); integer and bool tensors as stored."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def _safetensors_header(path: str) -> tuple[int, dict] | None:
    """(where the data starts, the tensor entries) of a safetensors file, or None for a header this reader
    does not handle (the safetensors library then reports or reads it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            return None
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    if not all(isinstance(e, dict) and e.get("dtype") in _SAFETENSORS_DTYPES for e in header.values()):
        return None
    return 8 + n, header


def _stream_safetensors(path: str, start: int, entries: dict, dtype) -> dict[str, torch.Tensor]:
    """``entries`` of a safetensors file read one at a time with plain file reads, each cast on arrival: what
    is resident is what is kept (in ``dtype``) plus the tensor being read, never the whole file as well."""
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        for key, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            file_dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if end - begin != math.prod(shape) * torch.empty((), dtype=file_dtype).element_size() or start + end > size:
                raise DreamPoseError(f"{path}: tensor {key!r} lies outside the file or has the wrong byte size; "
                                     "the file is truncated or corrupt: fetch it again")
            buf = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise DreamPoseError(f"{path}: the file ends inside tensor {key!r}; it is truncated: fetch it again")
            t = torch.frombuffer(buf, dtype=file_dtype) if buf else torch.empty(0, dtype=file_dtype)
            out[key] = _cast(t.reshape(shape), dtype)
    return out


def _read_safetensors(path: str, prefixes, dtype) -> dict[str, torch.Tensor]:
    """Memory-mapped (the library's zero-copy tensors: pages are read when used, and are the page cache's)
    when no tensor needs a cast; streamed and cast tensor by tensor when some do."""
    parsed = _safetensors_header(path)
    if parsed is not None and dtype is not None:
        start, header = parsed
        wanted = {k: e for k, e in header.items() if _wanted(k, prefixes)}
        floats = [e for e in wanted.values() if _SAFETENSORS_DTYPES[e["dtype"]].is_floating_point]
        if any(_SAFETENSORS_DTYPES[e["dtype"]] != dtype for e in floats):
            return _stream_safetensors(path, start, wanted, dtype)
    with _open_safetensors(path) as f:
        return {k: _cast(f.get_tensor(k), dtype) for k in f.keys() if _wanted(k, prefixes)}


def _release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped tensor once it has been copied (Linux ``madvise``).

    The mapping is private and never written, so the pages are the file's: dropping them loses nothing, and
    a later read would fault them back in. Elsewhere, or if the call fails, nothing happens.
    """
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    try:
        page = mmap.PAGESIZE
        lo = -(-t.data_ptr() // page) * page
        hi = ((t.data_ptr() + t.numel() * t.element_size()) // page) * page
        if hi > lo:
            _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)   # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def read_state_dict(path: str, what: str = "weights file", *, prefixes: tuple[str, ...] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or (weights-only) pickle file; ldm ``state_dict`` wrappers unwrapped.

    Args:
        prefixes: read only the tensors whose names start with one of these (the UNet of a single-file
            checkpoint, say); the others are never read.
        dtype: floating tensors are cast to this dtype as each arrives, so a half-precision file loaded for
            fp32 (or the other way round) never holds both copies of the whole model at once.
    """
    require_path(path, what, file=True)
    _check_suffix(path)
    if is_safetensors(path):
        return _read_safetensors(path, prefixes, dtype)
    if dtype is None and prefixes is None:
        return _unwrap(_torch_load(path), path)
    # memory-mapped: a tensor kept as stored stays a view of the file (read when used, as safetensors are);
    # one that is cast is read once, and its pages are dropped again after the cast
    state = _unwrap(_torch_load(path, mmap=zipfile.is_zipfile(path)), path)
    out = {}
    for key in list(state):
        t = state.pop(key)
        if not _wanted(key, prefixes):
            continue
        out[key] = _cast(t, dtype)
        if out[key] is not t:
            _release_pages(t)
    return out


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


# ------------------------------------------------------------------------------------- which file is which
# (here, not in the loaders, so the command line answers a wrong path before diffusers is imported)

def bundle_has_clip(path: str | None) -> bool:
    """Whether a DreamPose file carries its own CLIP vision tower (then no separate CLIP is needed).

    Reads the safetensors header only: ``True`` when its metadata holds ``clip_config``. ``None``, a folder, a
    missing file and any file that is not ``.safetensors`` give ``False``.
    """
    if not path or os.path.isdir(path) or not is_safetensors(path) or not os.path.isfile(path):
        return False
    return "clip_config" in read_metadata(path)


def newest_authors_unet(folder: str) -> str:
    """The authors' release folder → its newest ``unet_epoch_N.pth`` (largest N).

    Raises:
        DreamPoseError: the folder holds no ``unet_epoch_N.pth``.
    """
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := AUTHORS_UNET.match(name))
             and os.path.isfile(os.path.join(folder, name))]
    if not found:
        raise DreamPoseError(f"{folder}: is a folder without the authors' unet_epoch_N.pth; give the DreamPose "
                             "weights file (our .safetensors, or unet_epoch_N.pth)")
    return os.path.join(folder, max(found)[1])
