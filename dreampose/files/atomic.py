"""Atomic writes: every file goes to a temporary name beside its target and is renamed into place
only when complete, so a crash, a full disk or Ctrl-C never leaves a half-written file under the
final name (and a reader never mistakes one for a finished file)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_output(path: str, suffix: str = "", mode: int | None = None, tmp_name: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on any error (or
    Ctrl-C) delete it.

    Args:
        suffix: ending of the temporary name (it may pick a format, e.g. ``.mp4`` for OpenCV).
        mode: permissions to give the file (``mkstemp`` makes 0600); the umask applies.
        tmp_name: a fixed temporary name in the same folder instead of a random ``.tmp-*`` one, for a
            writer that must recognise its own leftovers (``prepare`` resumes interrupted folders).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if tmp_name is None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
        os.close(fd)
    else:
        tmp = os.path.join(folder, tmp_name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> str:
    """A text file (reports, logs, markers), atomically, with the usual permissions."""
    with atomic_output(path, os.path.splitext(path)[1], mode=0o666) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def write_json_atomic(path: str, data, **dump_options) -> str:
    """``json.dump(data, **dump_options)`` to ``path``, atomically."""
    return write_text_atomic(path, json.dumps(data, **dump_options))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> str:
    """Write safetensors to a temp name beside ``path`` and rename: no half-written file on a crash."""
    with atomic_output(path, ".safetensors", mode=0o666) as tmp:   # a model file gets the usual permissions
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata={k: str(v) for k, v in metadata.items()})
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
