"""Atomic writes, the one way the project writes files.

Every file goes to a temporary name beside its target, is flushed to the disk (``fsync``) and is renamed
into place only when complete, so a crash, a full disk or Ctrl-C never leaves a half-written file under
the final name (and a reader never mistakes one for a finished file). Write errors are raised, never
ignored, as a DreamPoseError that names the path, the cause and what to do
(:func:`~dreampose.files.destinations.write_error`).

Inside :func:`output_set`, the files of one job (frames, video, GIFs, report) appear together or not at
all: each writer's temporary file waits until the whole set is done, then all are renamed.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import json
import os
import signal
import tempfile
import threading

import numpy as np
import torch
from safetensors.torch import save_file

from .destinations import write_error

_CURRENT_SET: contextvars.ContextVar["OutputSet | None"] = contextvars.ContextVar("dreampose_output_set", default=None)


class OutputSet:
    """Temporary files waiting to be renamed to their final names together."""

    def __init__(self):
        self._pending: dict[str, tuple[str, int | None]] = {}   # final path → (temporary path, mode)

    def add(self, path: str, tmp: str, mode: int | None) -> None:
        final = os.path.abspath(path)
        old = self._pending.pop(final, None)
        if old is not None and old[0] != tmp:
            _remove(old[0])
        self._pending[final] = (tmp, mode)

    def commit(self) -> list[str]:
        """Flush every file, then rename all; returns the final paths. Ctrl-C while flushing deletes the
        temporary files (nothing appears); while renaming it is held back until every file is in place."""
        for final, (tmp, mode) in self._pending.items():
            try:
                _fsync(tmp)
                if mode is not None:
                    os.chmod(tmp, mode & ~_umask())
            except OSError as exc:
                self.discard()
                raise write_error(final, exc) from None
            except BaseException:
                self.discard()
                raise
        done = []
        with _interrupts_held():
            for final, (tmp, _) in self._pending.items():
                try:
                    os.replace(tmp, final)
                except OSError as exc:
                    self.discard()
                    raise write_error(final, exc) from None
                done.append(final)
        for folder in {os.path.dirname(p) for p in done}:
            _fsync_folder(folder)
        self._pending.clear()
        return done

    def discard(self) -> None:
        for tmp, _ in self._pending.values():
            _remove(tmp)
        self._pending.clear()


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT (Ctrl-C) held back until the block ends, then delivered: renaming finished files takes
    moments, and half a set renamed is what a set exists to prevent. Only the main thread can hold it (a
    worker thread, e.g. ComfyUI's, runs the block as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, caught[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


@contextlib.contextmanager
def output_set():
    """All files written by the project's writers inside this block appear together at its end, or, on
    any error or Ctrl-C, none does (their temporary files are deleted). Nested blocks join the outer one."""
    if _CURRENT_SET.get() is not None:
        yield _CURRENT_SET.get()
        return
    group = OutputSet()
    token = _CURRENT_SET.set(group)
    try:
        yield group
    except BaseException:
        group.discard()
        raise
    finally:
        _CURRENT_SET.reset(token)
    group.commit()


@contextlib.contextmanager
def atomic_output(path: str, suffix: str = "", mode: int | None = None, tmp_name: str | None = None):
    """Yield a temporary path beside ``path``; on success flush it and rename it to ``path`` (or, inside
    :func:`output_set`, leave the rename to the set), on any error (or Ctrl-C) delete it.

    Args:
        suffix: ending of the temporary name (it may pick a format, e.g. ``.mp4`` for OpenCV).
        mode: permissions to give the file (``mkstemp`` makes 0600); the umask applies.
        tmp_name: a fixed temporary name in the same folder instead of a random ``.tmp-*`` one, for a
            writer that must recognise its own leftovers (``prepare`` resumes interrupted folders).

    Raises:
        DreamPoseError: the write failed (read-only, full, size limit, permissions), with what to do.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        if tmp_name is None:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
            os.close(fd)
        else:
            tmp = os.path.join(folder, tmp_name)
    except OSError as exc:
        raise write_error(path, exc) from None
    group = _CURRENT_SET.get()
    try:
        yield tmp
        if group is not None:
            group.add(path, tmp, mode)
            return
        _fsync(tmp)
        if mode is not None:
            os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def write_bytes_atomic(path: str, data: bytes) -> str:
    """Bytes to ``path``, atomically, with the usual permissions; a short write is an error."""
    with atomic_output(path, os.path.splitext(path)[1], mode=0o666) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_npy_atomic(path: str, array: np.ndarray) -> str:
    """One ``.npy`` array (never pickled), atomically."""
    data = io.BytesIO()
    np.save(data, np.asarray(array), allow_pickle=False)
    return write_bytes_atomic(path, data.getvalue())


def write_text_atomic(path: str, text: str) -> str:
    """A text file (reports, logs, markers), atomically, with the usual permissions."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, data, **dump_options) -> str:
    """``json.dump(data, **dump_options)`` to ``path``, atomically."""
    return write_text_atomic(path, json.dumps(data, **dump_options))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> str:
    """Write safetensors to a temp name beside ``path`` and rename: no half-written file on a crash.

    safetensors reports a failed write as ``SafetensorError … os error N``; it becomes the same clear
    error as any other failed write.
    """
    with atomic_output(path, ".safetensors", mode=0o666) as tmp:   # a model file gets the usual permissions
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        try:
            save_file(contiguous, tmp, metadata={k: str(v) for k, v in metadata.items()})
        except OSError:
            raise
        except Exception as exc:                 # SafetensorError is not an OSError
            raise as_os_error(exc) from None
    return path


def as_os_error(exc: Exception) -> OSError:
    text = str(exc)
    marker = "os error "
    if marker in text:
        digits = text.split(marker, 1)[1].split(")", 1)[0].strip()
        if digits.isdigit():
            return OSError(int(digits), os.strerror(int(digits)))
    return OSError(text)


def _fsync(path: str) -> None:
    """Flush a written file to the disk, so a full disk shows here, not after the rename. A file system
    that cannot sync (some network or FUSE mounts) is not an error."""
    fd = os.open(path, os.O_RDWR)      # Windows commits only handles opened for writing
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable; not every file system lets a folder be synced (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
