"""Where outputs may go: checked before any work, explained when the disk says no.

Two promises to the user, kept by every command: an output never replaces one of the run's own inputs,
and never replaces an existing file this very job did not write unless the user says ``--force``. And
when a write fails (read-only mount, full disk, ``ulimit -f``, missing folder), the error names the
path, the cause and what to do, instead of an ``OSError`` traceback. Torch-free, so the command line
checks destinations before anything heavy is imported.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable

from ..errors import DreamPoseError

try:
    import resource
except ImportError:          # not on Windows
    resource = None

_CAUSES = {
    errno.EROFS: ("the file system is read-only", "write somewhere else"),
    errno.ENOSPC: ("no space is left on the device", "free some space or write somewhere else"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or write somewhere else"),
    errno.EFBIG: ("the file is larger than this process may write (ulimit -f)",
                  "raise the limit (ulimit -f unlimited) or write smaller outputs"),
    errno.EACCES: ("permission denied", "write to a folder you own"),
    errno.EPERM: ("permission denied", "write to a folder you own"),
    errno.ENOENT: ("its folder does not exist", "create the folder first or check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("it is a folder", "give a file name"),
}


def write_error(path: str, exc: BaseException) -> DreamPoseError:
    """The DreamPoseError for a failed write of ``path``: what failed, why, and what to do."""
    code = getattr(exc, "errno", None)
    cause, todo = _CAUSES.get(code, (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__,
                                     "check the destination"))
    free = _free_bytes(path)
    if code in (errno.ENOSPC, errno.EDQUOT) and free is not None:
        cause += f" ({free / 2 ** 20:.1f} MiB free)"
    return DreamPoseError(f"could not write {path}: {cause}; {todo}. Nothing was left under that name.")


def incomplete_write(path: str, what: str) -> DreamPoseError:
    """A writer that reports no error but produced less than it should (OpenCV's video writer): the
    likely causes, measured, in the message."""
    hints = []
    free = _free_bytes(path)
    if free is not None and free < 64 * 2 ** 20:
        hints.append(f"{free / 2 ** 20:.1f} MiB free on that device")
    limit = _file_size_limit()
    if limit is not None:
        hints.append(f"file-size limit {limit} bytes (ulimit -f)")
    why = f" ({'; '.join(hints)})" if hints else ""
    return DreamPoseError(f"could not write {path}: {what}{why}; free some space or write somewhere else. "
                          "Nothing was left under that name.")


def _file_size_limit() -> int | None:
    """This process's ``ulimit -f`` in bytes, None when unlimited or not a POSIX system (Windows)."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _free_bytes(path: str) -> int | None:
    folder = _existing_ancestor(os.path.dirname(os.path.abspath(path)))
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _existing_ancestor(folder: str) -> str:
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder or "."


def check_writable(path: str, flag: str, *, need_bytes: int = 0) -> None:
    """The folder that will hold ``path`` (or the nearest existing folder above it) can take a new file:
    not read-only, writable by us, and, when ``need_bytes`` is given, with that much space free."""
    folder = _existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(folder):
        raise DreamPoseError(f"{flag} {path}: {folder} is a file, not a folder; check the path")
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):     # no statvfs on Windows: the write itself will say
        read_only = False
    if read_only:
        raise DreamPoseError(f"{flag} {path}: {folder} is on a read-only file system; write somewhere else")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DreamPoseError(f"{flag} {path}: no permission to write in {folder}; write to a folder you own")
    try:     # what the flags cannot tell (/proc, some network mounts): a real file, gone again at once
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
    except OSError as exc:
        raise DreamPoseError(f"{flag} {path}: no file can be created in {folder} ({exc.strerror or exc}); write "
                             "somewhere else") from None
    os.close(fd)
    os.unlink(probe)
    free = _free_bytes(path)
    if need_bytes and free is not None and free < need_bytes:
        raise DreamPoseError(f"{flag} {path}: about {need_bytes / 2 ** 20:.0f} MiB are needed and only "
                             f"{free / 2 ** 20:.0f} MiB are free there; free some space or write somewhere else")


def _matches(name: str, patterns: list[str | re.Pattern]) -> bool:
    return any(p.match(name) if isinstance(p, re.Pattern) else name == p for p in patterns)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_not_an_input(path: str, flag: str, inputs: Iterable[tuple[str, str | None]]) -> None:
    """``path`` is none of the run's inputs (``(flag, path)`` pairs; a folder input covers its files)."""
    real = os.path.realpath(path)
    for in_flag, in_path in inputs:
        if not in_path:
            continue
        inside = os.path.isdir(in_path) and real.startswith(os.path.realpath(in_path) + os.sep)
        if _same_file(path, in_path) or inside:
            raise DreamPoseError(f"{flag} {path} is {'inside ' if inside else ''}the input {in_flag} {in_path}: "
                                 "writing there would destroy it; give another output name")


def check_output_file(path: str, flag: str, *, inputs: Iterable[tuple[str, str | None]] = (), force: bool = False,
                      ours: Callable[[str], bool] | None = None, suffix: str | None = None,
                      need_bytes: int = 0) -> str:
    """Before any work: ``path`` may receive this command's output file.

    Refused: a folder; a wrong ``suffix``; one of the ``inputs`` (always, even with ``force``); an
    existing file unless ``force`` or ``ours(path)`` says this very job wrote it (then it may be
    reused or rewritten); a destination that cannot take the file (:func:`check_writable`).
    """
    if os.path.isdir(path):
        ending = f" ending in {suffix}" if suffix else ""
        raise DreamPoseError(f"{flag} {path} is a folder; give a file name{ending}")
    check_not_an_input(path, flag, inputs)
    if suffix and not path.lower().endswith(suffix):
        raise DreamPoseError(f"{flag} {path}: the file must end in {suffix}")
    if os.path.exists(path) and not force and not (ours is not None and ours(path)):
        raise DreamPoseError(f"{flag} {path} already exists and this command did not write it for this job; "
                             "pass --force to replace it, or give another name")
    check_writable(path, flag, need_bytes=need_bytes)
    return path


def check_output_folder(folder: str, flag: str, names: Iterable[str | re.Pattern], *,
                        inputs: Iterable[tuple[str, str | None]] = (), force: bool = False,
                        same_job: Callable[[str], bool] | None = None) -> str:
    """Before any work: ``folder`` may receive this command's files ``names`` (file names, or compiled
    patterns they match). Existing ones are replaced only with ``force`` or when ``same_job(folder)``
    says the folder holds an earlier run of this very job (same command and options)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DreamPoseError(f"{flag} {folder} is a file; give a folder")
    patterns = list(names)
    for in_flag, in_path in inputs:
        if in_path and os.path.isdir(folder) and _same_file(folder, in_path):
            raise DreamPoseError(f"{flag} {folder} is the input {in_flag}: give another output folder")
        # an input this run would write over: never, --force or not
        if (in_path and os.path.isdir(folder) and _same_file(os.path.dirname(os.path.abspath(in_path)), folder)
                and _matches(os.path.basename(in_path), patterns)):
            raise DreamPoseError(f"{in_flag} {in_path} is one of the files this run writes into {flag} {folder}; "
                                 "move it elsewhere or give another output folder")
    if os.path.isdir(folder) and not force and not (same_job is not None and same_job(folder)):
        taken = sorted(n for n in os.listdir(folder) if _matches(n, patterns))
        if taken:
            more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
            raise DreamPoseError(f"{flag} {folder} already holds {', '.join(taken[:3])}{more} from another run; "
                                 "pass --force to replace them, or give an empty folder")
    check_writable(os.path.join(folder, "x"), flag)
    return folder
