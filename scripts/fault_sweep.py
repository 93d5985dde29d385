#!/usr/bin/env python3
"""Fault sweep of ``python -m dreampose``: bad inputs, broken files and failing disks, every command.

Each case runs one command line in its own folder and records its exit status, whether stderr holds a
Python traceback, whether the outputs of a successful run are valid (PNG, MP4, GIF, JSON, safetensors),
whether temporary (``.tmp-*``) or partial outputs are left behind, and whether a file that existed
before the run (an input, or a file that merely sat where an output goes) was changed. It then says OK
or DEFECT (with the reason) and prints a table and the totals.

    OK      a clear one-line error and a non-zero exit, nothing damaged; or exit 0 with a correct
            result where the input was in fact acceptable.
    DEFECT  anything else: a traceback, exit 0 on a bad input, an input or an unrelated file
            replaced, leftovers, an invalid output, a misleading message, no limit before heavy work.
    SKIP    the case needs something this machine lacks (e.g. mounting a tmpfs needs root).

Standard library only; the inputs are made in a temporary folder with the repository's own commands
(``synth``, ``finetune-subject``, ``train``) and a few lines of Python run by the repository's venv.
Sizes are tiny (64x64, 1-3 frames, 1-2 steps) so it fits a 2-core machine in about 10-15 minutes.

    python scripts/fault_sweep.py                 # every case
    python scripts/fault_sweep.py --only animate  # the cases whose name contains "animate"
    python scripts/fault_sweep.py --keep          # keep the temporary folder (printed at the end)
    python scripts/fault_sweep.py --json out/fault_sweep.json --report out/fault_sweep_cases.md

Memory-hungry cases run under ``ulimit -v`` so that a missing size limit shows as an error, not as a
machine brought down. Disk-full and read-only cases mount small tmpfs folders (root only; skipped
otherwise) and unmount them afterwards.
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")
PY = VENV_PY if os.path.exists(VENV_PY) else sys.executable
DEMO_BUNDLE = os.path.join(REPO, "dreampose", "assets", "demo_dreampose.safetensors")
TRACEBACK = "Traceback (most recent call last)"
MEM_LIMIT_KB = 6_000_000          # ulimit -v for the "huge number" cases
HUGE_TIMEOUT = 75                 # a missing limit shows as a run still going after this long
DEFAULT_TIMEOUT = 150

ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))


def dp(*args) -> list[str]:
    """``python -m dreampose ARGS`` (a list argument adds its items)."""
    flat = []
    for a in args:
        flat += [str(x) for x in a] if isinstance(a, (list, tuple)) else [str(a)]
    return [PY, "-m", "dreampose", *flat]


def with_ulimit(cmd: list[str], *, f: int | None = None, v: int | None = None) -> list[str]:
    """``cmd`` under bash ``ulimit -f`` (1 KiB blocks) and/or ``ulimit -v`` (KiB)."""
    limits = []
    if f is not None:
        limits.append(f"ulimit -f {f}")
    if v is not None:
        limits.append(f"ulimit -v {v}")
    return ["bash", "-c", "; ".join(limits) + "; exec " + shlex.join(cmd)]


# ============================================================================================ file checks

def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(paths) -> dict[str, str]:
    """path → hash for files (every file below a folder); missing → 'absent'."""
    out = {}
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                for n in files:
                    q = os.path.join(root, n)
                    out[q] = sha(q) if os.path.isfile(q) else "special"
        elif os.path.isfile(p):
            out[p] = sha(p)
        else:
            out[p] = "absent"
    return out


def png_problem(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return f"{path}: unreadable ({exc})"
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return f"{os.path.basename(path)}: not a PNG"
    pos, idat = 8, b""
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if len(chunk) != length:
            return f"{os.path.basename(path)}: truncated PNG"
        if kind == b"IDAT":
            idat += chunk
        if kind == b"IEND":
            try:
                zlib.decompress(idat)
            except zlib.error:
                return f"{os.path.basename(path)}: PNG image data corrupt"
            return None
        pos += 12 + length
    return f"{os.path.basename(path)}: PNG without IEND (truncated)"


def mp4_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{os.path.basename(path)} missing"
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 100 or b"ftyp" not in data[:64] or b"moov" not in data:
        return f"{os.path.basename(path)}: not a complete MP4 ({len(data)} bytes)"
    return None


def gif_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{os.path.basename(path)} missing"
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"GIF8") or not data.endswith(b";"):
        return f"{os.path.basename(path)}: not a complete GIF"
    return None


def json_problem(path: str) -> str | None:
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        return f"{os.path.basename(path)}: not valid JSON ({exc})"
    return None


def safetensors_problem(path: str) -> str | None:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        return f"{os.path.basename(path)}: not a readable safetensors file ({exc})"
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{os.path.basename(path)}: safetensors size {size} != header's {8 + n + end}"
    return None


def npy_problem(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(6)
    return None if head == b"\x93NUMPY" else f"{os.path.basename(path)}: not a .npy file"


def leftovers(folder: str) -> list[str]:
    """Temporary files a writer left: ``.tmp-*`` (atomic writes), ``.*.tmp`` (prepare), ``.tmp-step_*``."""
    found = []
    for root, dirs, files in os.walk(folder):
        for n in files + dirs:
            if n.startswith(".tmp-") or (n.startswith(".") and n.endswith(".tmp")) or n.endswith(".partial"):
                found.append(os.path.relpath(os.path.join(root, n), folder))
    return found


def frames_problems(out: str, count: int, video: bool = True) -> list[str]:
    problems = []
    pngs = sorted(n for n in os.listdir(out) if re.match(r"^frame_\d{4,}\.png$", n)) if os.path.isdir(out) else []
    if len(pngs) != count:
        problems.append(f"expected {count} frame PNGs in --out, found {len(pngs)}")
    problems += [p for p in (png_problem(os.path.join(out, n)) for n in pngs) if p]
    if video:
        problems += [p for p in [mp4_problem(os.path.join(out, "dreampose.mp4")),
                                 json_problem(os.path.join(out, "dreampose_run.json"))] if p]
    return problems


# ============================================================================================ cases

@dataclass
class Spec:
    cmd: list[str]
    expect: str = "fail"                    # fail | ok | either
    watch: list[str] = field(default_factory=list)    # pre-existing files/folders that must not change
    absent: list[str] = field(default_factory=list)   # paths that must not exist after a failed run
    check: Callable[["Result"], list[str]] | None = None   # more problems (outputs of an ok run, messages)
    msg: str | None = None                  # regex the error output should match (a helpful message)
    not_msg: str | None = None              # regex it must not match (a misleading message)
    sigint_after: str | None = None         # send SIGINT once stderr matches this regex
    sigint_delay: float = 1.0
    rc: int | None = None                   # the exit status required (e.g. 130 after Ctrl-C)
    timeout: int = DEFAULT_TIMEOUT
    slow_ok: bool = False                   # a timeout is not a defect (long but legitimate work)
    skip: str | None = None                 # why it cannot run here
    limit: bool = False                     # a size/count that a check should refuse before any heavy work


@dataclass
class Result:
    name: str
    command: str
    rc: int | None = None
    seconds: float = 0.0
    traceback: bool = False
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    verdict: str = ""
    reasons: list[str] = field(default_factory=list)
    dir: str = ""


CASES: list[tuple[str, str, Callable]] = []     # (name, class, builder(fx, d) -> Spec)


def case(name: str, klass: str = "new"):
    def register(fn):
        CASES.append((name, klass, fn))
        return fn
    return register


class Fixtures:
    """The shared inputs, made once (read-only for the cases: a case that needs to damage one copies it)."""

    def __init__(self, root: str):
        self.root = root
        self.dp = DEMO_BUNDLE
        self.data = os.path.join(root, "data")                 # data/test/world_0000: 3 frames 64x64
        self.video = os.path.join(self.data, "test", "world_0000")
        self.img = os.path.join(root, "key.png")
        self.poses = os.path.join(root, "poses")
        self.subj_img = os.path.join(root, "subject", "images")
        self.subj_pose = os.path.join(root, "subject", "poses")
        self.auth = os.path.join(root, "authors")
        self.subject = os.path.join(root, "subject.safetensors")   # a LoRA subject finetune of the demo bundle
        self.run = os.path.join(root, "train_run")                 # a 2-step run, checkpoints step_1, step_2
        self.other = os.path.join(root, "other_base.safetensors")     # the demo bundle with other UNet weights
        self.text_png = os.path.join(root, "key_with_text.png")       # key.png plus a tEXt chunk
        self.can_mount = False
        self.log: list[str] = []

    # ---------------------------------------------------------------------------------- build
    def sh(self, cmd: list[str], what: str, timeout: int = 300) -> None:
        p = subprocess.run(cmd, cwd=self.root, env=ENV, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise SystemExit(f"fixture {what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")

    def build(self) -> None:
        t0 = time.time()
        os.makedirs(self.root, exist_ok=True)
        self.sh(dp("synth", "--out", self.data, "--videos", 1, "--frames", 3, "--height", 64, "--width", 64,
                   "--split", "test", "--quiet"), "synth")
        shutil.copy(os.path.join(self.video, "frame_0.png"), self.img)
        with open(self.img, "rb") as f:
            png = f.read()
        text = b"Comment\0my note"
        chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
        write(self.text_png, png[:-12] + chunk + png[-12:])     # before IEND
        os.makedirs(self.poses)
        for i in range(3):
            shutil.copy(os.path.join(self.video, f"frame_{i}_densepose.npy"), self.poses)
        os.makedirs(self.subj_img)
        os.makedirs(self.subj_pose)
        shutil.copy(os.path.join(self.video, "frame_0.png"), self.subj_img)
        shutil.copy(os.path.join(self.video, "frame_0_densepose.npy"), self.subj_pose)
        os.makedirs(self.auth)
        self.python(f"""
import json, torch
from safetensors import safe_open
from safetensors.torch import save_file
f = safe_open({self.dp!r}, 'pt'); meta = f.metadata()
d = {{k: f.get_tensor(k) for k in f.keys()}}
A = {self.auth!r}
for pre, name in (('unet.', 'unet_epoch_1.pth'), ('adapter.', 'adapter_1.pth'), ('vae.', 'vae_1.pth')):
    torch.save({{k[len(pre):]: v for k, v in d.items() if k.startswith(pre)}}, A + '/' + name)
save_file({{k[4:]: v.contiguous() for k, v in d.items() if k.startswith('vae.')}}, A + '/vae_1.safetensors')
open(A + '/unet_config.json', 'w').write(meta['unet_config'])
save_file({{k: (v * 1.02 if k.startswith('unet.') and v.is_floating_point() else v).contiguous()
           for k, v in d.items()}}, {self.other!r}, metadata=meta)
open(A + '/vae_config.json', 'w').write(meta['vae_config'])
""", "authors' files")
        self.sh(dp("finetune-subject", "--dreampose", self.dp, "--images", self.subj_img, "--poses", self.subj_pose,
                   "--out", self.subject, "--steps", 1, "--width", 64, "--height", 64, "--quiet", "--device", "cpu",
                   "--threads", 1), "finetune-subject")
        self.sh(dp("train", "--data", self.data, "--init", self.dp, "--out", self.run, "--steps", 2, "--batch-size", 1,
                   "--micro-batch", 1, "--width", 64, "--height", 64, "--save-every", 1, "--keep", 2, "--cpu",
                   "--workers", 0, "--quiet", "--threads", 1), "train")
        probe = os.path.join(self.root, "mnt_probe")
        os.makedirs(probe)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True)
        if mounted.returncode == 0:
            subprocess.run(["umount", probe], capture_output=True)
            self.can_mount = True
        self.log.append(f"fixtures built in {time.time() - t0:.0f} s (tmpfs mounts: "
                        f"{'yes' if self.can_mount else 'no, those cases are skipped'})")

    def python(self, code: str, what: str) -> None:
        self.sh([PY, "-c", code], what)

    # ---------------------------------------------------------------------------------- helpers for cases
    def animate(self, out: str, *extra, image=None, poses=None, dreampose=None, quiet: bool = True) -> list[str]:
        args = ["animate", "--dreampose", dreampose or self.dp, "--image", image or self.img, "--poses",
                poses or self.poses, "--out", out, "--width", 64, "--height", 64, "--steps", 1, "--device", "cpu",
                "--threads", 1]
        return dp(*args, *(["--quiet"] if quiet else []), *extra)

    def demo(self, out: str, *extra) -> list[str]:
        return dp("demo", "--out", out, "--frames", 2, "--finetune-steps", 0, "--vae-finetune-steps", 0, "--steps", 1,
                  "--width", 64, "--height", 64, "--quiet", "--device", "cpu", "--threads", 1, *extra)

    def fsubj(self, out: str, *extra, images=None, poses=None, dreampose=None, quiet=True) -> list[str]:
        return dp("finetune-subject", "--dreampose", dreampose or self.dp, "--images", images or self.subj_img,
                  "--poses", poses or self.subj_pose, "--out", out, "--steps", 1, "--width", 64, "--height", 64,
                  "--device", "cpu", "--threads", 1, *(["--quiet"] if quiet else []), *extra)

    def fvae(self, out: str, *extra, images=None, dreampose=None) -> list[str]:
        return dp("finetune-vae", "--dreampose", dreampose or self.dp, "--images", images or self.subj_img,
                  "--out", out, "--steps", 1, "--width", 64, "--height", 64, "--quiet", "--device", "cpu",
                  "--threads", 1, *extra)

    def bench(self, *extra) -> list[str]:
        return dp("bench", "--frames", 1, "--frames-per-batch", 1, "--steps", 1, "--repeats", 1, "--width", 64,
                  "--height", 64, "--quiet", "--device", "cpu", "--threads", 1, *extra)

    def synth(self, out: str, *extra) -> list[str]:
        return dp("synth", "--out", out, "--videos", 1, "--frames", 2, "--height", 64, "--width", 64, "--split",
                  "test", "--quiet", *extra)

    def train(self, out: str, *extra, data=None, init=None, quiet=True) -> list[str]:
        return dp("train", "--data", data or self.data, "--init", init or self.dp, "--out", out, "--steps", 1,
                  "--batch-size", 1, "--micro-batch", 1, "--width", 64, "--height", 64, "--cpu", "--workers", 0,
                  "--threads", 1, *(["--quiet"] if quiet else []), *extra)

    def eval(self, out: str, *extra, data=None, dreampose=None) -> list[str]:
        return dp("eval", "--data", data or self.data, "--dreampose", dreampose or self.dp, "--out", out, "--steps", 1,
                  "--width", 64, "--height", 64, "--max-frames", 2, "--device", "cpu", "--quiet", "--threads", 1,
                  "--no-discover", *extra)

    def convert(self, out: str, *extra, unet=None) -> list[str]:
        return dp("convert", unet or os.path.join(self.auth, "unet_epoch_1.pth"), "--unet-config",
                  os.path.join(self.auth, "unet_config.json"), "--out", out, *extra)

    def copy_run(self, d: str) -> str:
        dst = os.path.join(d, "run")
        shutil.copytree(self.run, dst)
        return dst

    def mount(self, d: str, name: str, *, size: str = "64m", ro: bool = False) -> str:
        path = os.path.join(d, name)
        os.makedirs(path, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], check=True, capture_output=True)
        return path


def write(path: str, data: bytes | str = b"") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def npy_bytes(dtype: str, shape: tuple, fill) -> bytes:
    """A .npy file (format 1.0) without numpy: header + raw little-endian data."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (dtype, shape)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    count = 1
    for s in shape:
        count *= s
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + fill(count)


def pose_folder(fx: Fixtures, d: str, first: bytes | None = None, name: str = "frame_0_densepose.npy") -> str:
    folder = os.path.join(d, "poses")
    shutil.copytree(fx.poses, folder)
    if first is not None:
        write(os.path.join(folder, name), first)
    return folder


def nan_f32(n: int) -> bytes:
    return struct.pack("<f", float("nan")) * n


EVIL = """
import os, pickle, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + {marker!r},))
torch.save({{"conv_in.weight": Evil()}}, {path!r})
"""


def make_evil(fx: Fixtures, path: str, marker: str) -> None:
    fx.python(EVIL.format(marker=marker, path=path), "malicious pickle")


def outputs_ok(out: str, count: int = 3) -> Callable[[Result], list[str]]:
    return lambda r: frames_problems(out, count)


def files_ok(*checks) -> Callable[[Result], list[str]]:
    def check(r: Result) -> list[str]:
        problems = []
        for fn, path in checks:
            if not os.path.exists(path):
                problems.append(f"{os.path.basename(path)} missing")
            else:
                p = fn(path)
                if p:
                    problems.append(p)
        return problems
    return check


def no_file(path: str, what: str) -> Callable[[Result], list[str]]:
    return lambda r: [what] if os.path.exists(path) else []


def stderr_has(pattern: str, what: str) -> Callable[[Result], list[str]]:
    return lambda r: [] if re.search(pattern, r.stderr, re.I) else [what]


def both(*checks) -> Callable[[Result], list[str]]:
    return lambda r: [p for c in checks if c for p in c(r)]


# ----------------------------------------------------------------------------------------------- animate

@case("animate/ok-unicode-space-paths", "sanity")
def _(fx, d):
    img = os.path.join(d, "my key frame é.png")
    shutil.copy(fx.img, img)
    out = os.path.join(d, "out dir", "ünïcødé 出力")
    return Spec(fx.animate(out, image=img), expect="ok", check=outputs_ok(out))


@case("animate/image-is-folder", "7 misleading")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), image=fx.video), msg="folder")


@case("animate/image-empty-file")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), image=write(os.path.join(d, "empty.png"))))


@case("animate/image-is-text-named-png")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), image=write(os.path.join(d, "x.png"), "hello")))


@case("animate/poses-is-a-file")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), poses=fx.img))


@case("animate/poses-empty-folder")
def _(fx, d):
    os.makedirs(os.path.join(d, "p"))
    return Spec(fx.animate(os.path.join(d, "o"), poses=os.path.join(d, "p")))


@case("animate/pose-npy-of-strings", "5 silently accepted")
def _(fx, d):
    data = npy_bytes("<U4", (2, 64, 64), lambda n: ("abcd" * n).encode("utf-32-le"))
    return Spec(fx.animate(os.path.join(d, "o"), poses=pose_folder(fx, d, data)))


@case("animate/pose-npy-uint8-0-255", "5 silently accepted")
def _(fx, d):
    data = npy_bytes("|u1", (2, 64, 64), lambda n: bytes([200]) * n)
    return Spec(fx.animate(os.path.join(d, "o"), poses=pose_folder(fx, d, data)))


@case("animate/pose-npy-complex", "5 silently accepted")
def _(fx, d):
    data = npy_bytes("<c8", (2, 64, 64), lambda n: b"\0" * 8 * n)
    return Spec(fx.animate(os.path.join(d, "o"), poses=pose_folder(fx, d, data)))


@case("animate/pose-npy-0-bytes")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), poses=pose_folder(fx, d, b"")))


@case("animate/pose-npy-truncated")
def _(fx, d):
    with open(os.path.join(fx.poses, "frame_0_densepose.npy"), "rb") as f:
        data = f.read()
    return Spec(fx.animate(os.path.join(d, "o"), poses=pose_folder(fx, d, data[:len(data) // 2])))


@case("animate/pose-npy-empty-shape-2x0x0")
def _(fx, d):
    folder = os.path.join(d, "poses")
    os.makedirs(folder)
    write(os.path.join(folder, "frame_0_densepose.npy"), npy_bytes("<f4", (2, 0, 0), lambda n: b""))
    return Spec(fx.animate(os.path.join(d, "o"), poses=folder))


@case("animate/pose-npy-is-a-folder")
def _(fx, d):
    folder = pose_folder(fx, d)
    os.remove(os.path.join(folder, "frame_1_densepose.npy"))
    os.makedirs(os.path.join(folder, "frame_1_densepose.npy"))
    return Spec(fx.animate(os.path.join(d, "o"), poses=folder))


@case("animate/width-100032", "4 limits")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--width", 100032), timeout=HUGE_TIMEOUT)


@case("animate/width-negative")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--width", -64))


@case("animate/seed-2**64", "4 limits")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--seed", 2 ** 64))


@case("animate/steps-1001-ddim (more than the 1000 train timesteps)")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(fx.animate(out, "--steps", 1001, "--sampler", "ddim"), expect="either",
                check=lambda r: frames_problems(out, 3) if r.rc == 0 else [], timeout=240)


@case("animate/steps-0")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--steps", 0))


@case("animate/s-image-1e6", "5 silently accepted")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--s-image", "1e6"))


@case("animate/s-pose-nan")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--s-pose", "nan"))


@case("animate/guidance-start-after-end")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--guidance-start", 0.9, "--guidance-end", 0.1))


@case("animate/fps-0")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--fps", 0))


@case("animate/fps-1e-9", "7 misleading")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(fx.animate(out, "--fps", "1e-9"), expect="either", not_msg=r"may lack the MPEG-4 encoder",
                check=lambda r: frames_problems(out, 3) if r.rc == 0 else [])


@case("animate/fps-1e300", "7 misleading")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(fx.animate(out, "--fps", "1e300"), expect="either", not_msg=r"may lack the MPEG-4 encoder",
                check=lambda r: frames_problems(out, 3) if r.rc == 0 else [])


@case("animate/frames-per-batch-0")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--frames-per-batch", 0))


@case("animate/uv-smoothing-9")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--uv-smoothing", 9))


@case("animate/first-frame-past-the-end")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--first-frame", 5))


@case("animate/frames-range-empty-5:2")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--frames", "5:2"))


@case("animate/init-latents-nan", "5 silently accepted")
def _(fx, d):
    path = os.path.join(d, "nan.safetensors")
    header = json.dumps({"latents": {"dtype": "F32", "shape": [1, 4, 8, 8], "data_offsets": [0, 1024]}}).encode()
    write(path, struct.pack("<Q", len(header)) + header + nan_f32(256))
    return Spec(fx.animate(os.path.join(d, "o"), "--init-latents", path))


@case("animate/init-latents-wrong-shape")
def _(fx, d):
    path = os.path.join(d, "bad.safetensors")
    header = json.dumps({"latents": {"dtype": "F32", "shape": [1, 4, 2, 2], "data_offsets": [0, 64]}}).encode()
    write(path, struct.pack("<Q", len(header)) + header + b"\0" * 64)
    return Spec(fx.animate(os.path.join(d, "o"), "--init-latents", path))


@case("animate/init-latents-is-a-folder", "7 misleading")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--init-latents", d), not_msg=r"not found")


@case("animate/init-latents-inside-out-with-force", "1 data loss")
def _(fx, d):
    out = os.path.join(d, "o")
    first = os.path.join(d, "first")
    subprocess.run(fx.animate(first, "--save-latents"), env=ENV, capture_output=True, cwd=d)
    os.makedirs(out)
    latents = shutil.copy(os.path.join(first, "init_latents.safetensors"),
                          os.path.join(out, "init_latents.safetensors"))
    return Spec(fx.animate(out, "--init-latents", latents, "--save-latents", "--force"), watch=[latents])


@case("animate/image-inside-out-with-force", "1 data loss")
def _(fx, d):
    out = os.path.join(d, "o")
    img = shutil.copy(fx.img, write(os.path.join(out, "frame_0000.png")))
    return Spec(fx.animate(out, "--force", image=img), watch=[img])


@case("animate/out-holds-unrelated-frame", "1 data loss")
def _(fx, d):
    out = os.path.join(d, "o")
    keep = shutil.copy(fx.img, write(os.path.join(out, "frame_0001.png")))
    return Spec(fx.animate(out), watch=[keep], msg="--force")


@case("animate/out-is-the-poses-folder", "1 data loss")
def _(fx, d):
    poses = pose_folder(fx, d)
    return Spec(fx.animate(poses, poses=poses), watch=[poses])


@case("animate/out-is-a-file")
def _(fx, d):
    f = write(os.path.join(d, "somefile.txt"), "keep me")
    return Spec(fx.animate(f), watch=[f])


@case("animate/out-parent-is-a-file", "3 unwritable")
def _(fx, d):
    f = write(os.path.join(d, "somefile.txt"), "keep me")
    return Spec(fx.animate(os.path.join(f, "sub")), watch=[f])


@case("animate/out-under-proc", "3 unwritable")
def _(fx, d):
    return Spec(fx.animate("/proc/dreampose_sweep_out"))


@case("animate/ulimit-f-8", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(with_ulimit(fx.animate(out), f=8), absent=[os.path.join(out, "frame_0000.png"),
                                                          os.path.join(out, "dreampose.mp4")])


@case("animate/disk-full-tmpfs-16k", "3 unwritable")
def _(fx, d):
    if not fx.can_mount:
        return Spec([], skip="mount needs root")
    out = os.path.join(fx.mount(d, "full", size="16k"), "o")
    return Spec(fx.animate(out), absent=[os.path.join(out, "frame_0000.png"), os.path.join(out, "dreampose.mp4")])


@case("animate/read-only-mount", "3 unwritable")
def _(fx, d):
    if not fx.can_mount:
        return Spec([], skip="mount needs root")
    return Spec(fx.animate(os.path.join(fx.mount(d, "ro", ro=True), "o")))


@case("animate/sigint-while-sampling", "Ctrl-C")
def _(fx, d):
    out = os.path.join(d, "o")
    cmd = fx.animate(out, "--steps", 200, quiet=False)
    return Spec(cmd, sigint_after=r"sampling", rc=130, absent=[os.path.join(out, "frame_0000.png"),
                                                             os.path.join(out, "dreampose.mp4")])


@case("animate/subject-from-another-base", "5 silently accepted")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--subject", fx.subject, dreampose=fx.other))


@case("animate/subject-is-a-folder")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--subject", d))


@case("animate/subject-is-a-png")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--subject", fx.img))


@case("animate/dreampose-0-byte-safetensors")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), dreampose=write(os.path.join(d, "w.safetensors"))))


@case("animate/dreampose-truncated-safetensors")
def _(fx, d):
    with open(fx.dp, "rb") as f:
        data = f.read(200_000)
    return Spec(fx.animate(os.path.join(d, "o"), dreampose=write(os.path.join(d, "w.safetensors"), data)))


@case("animate/dreampose-0-byte-unet_epoch_20.pth", "7 misleading")
def _(fx, d):
    unet = write(os.path.join(d, "rel", "unet_epoch_20.pth"))
    shutil.copy(os.path.join(fx.auth, "adapter_1.pth"), os.path.join(d, "rel", "adapter_20.pth"))
    cmd = fx.animate(os.path.join(d, "o"), "--clip", fx.dp, dreampose=unet)
    return Spec(cmd, msg=r"empty|0 bytes")


@case("animate/dreampose-malicious-pickle", "6 pickle")
def _(fx, d):
    marker = os.path.join(d, "PWNED")
    unet = os.path.join(d, "rel", "unet_epoch_1.pth")
    os.makedirs(os.path.dirname(unet))
    make_evil(fx, unet, marker)
    shutil.copy(os.path.join(fx.auth, "adapter_1.pth"), os.path.join(d, "rel"))
    return Spec(fx.animate(os.path.join(d, "o"), "--clip", fx.dp, dreampose=unet),
                check=no_file(marker, "the pickle's code ran"))


@case("animate/dreampose-is-a-txt", "7 misleading")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), dreampose=write(os.path.join(d, "w.txt"), "x")),
                not_msg=r"--clip is required")


@case("animate/dreampose-file-missing (typo)", "7 misleading")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), dreampose=os.path.join(d, "dreampsoe.safetensors")),
                msg=r"not found|no such|does not exist")


@case("animate/clip-is-an-image")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--clip", fx.img))


@case("animate/device-banana")
def _(fx, d):
    cmd = fx.animate(os.path.join(d, "o"))
    cmd[cmd.index("cpu")] = "banana"
    return Spec(cmd)


@case("animate/device-cuda-7")
def _(fx, d):
    cmd = fx.animate(os.path.join(d, "o"))
    cmd[cmd.index("cpu")] = "cuda:7"
    return Spec(cmd)


@case("animate/threads-0")
def _(fx, d):
    return Spec(fx.animate(os.path.join(d, "o"), "--threads", 0))


# ----------------------------------------------------------------------------------------------- demo

@case("demo/ok", "sanity")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(fx.demo(out), expect="ok", check=both(lambda r: frames_problems(out, 2), files_ok(
        (gif_problem, os.path.join(out, "dreampose.gif")), (gif_problem, os.path.join(out, "comparison.gif")),
        (png_problem, os.path.join(out, "contact_sheet.png")), (png_problem, os.path.join(out, "key_frame.png")))))


@case("demo/frames-10**9", "4 limits")
def _(fx, d):
    return Spec(with_ulimit(fx.demo(os.path.join(d, "o"), "--frames", 10 ** 9), v=MEM_LIMIT_KB),
                timeout=HUGE_TIMEOUT)


@case("demo/subject-3 (a valid subject index)")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(fx.demo(out, "--subject", 3), expect="ok", check=lambda r: frames_problems(out, 2))


@case("demo/finetune-lr-1e6", "5 silently accepted")
def _(fx, d):
    cmd = fx.demo(os.path.join(d, "o"), "--finetune-lr", "1e6")
    cmd[cmd.index("--finetune-steps") + 1] = "1"
    return Spec(cmd)


@case("demo/image-is-folder", "7 misleading")
def _(fx, d):
    return Spec(fx.demo(os.path.join(d, "o"), "--image", d), msg="folder")


@case("demo/image-inside-out-with-force", "1 data loss")
def _(fx, d):
    out = os.path.join(d, "o")
    img = shutil.copy(fx.text_png, write(os.path.join(out, "key_frame.png")))
    return Spec(fx.demo(out, "--image", img, "--force"), watch=[img])


@case("demo/steps-0")
def _(fx, d):
    return Spec(fx.demo(os.path.join(d, "o"), "--steps", 0))


@case("demo/ulimit-f-8", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(with_ulimit(fx.demo(out), f=8), absent=[os.path.join(out, "dreampose.gif"),
                                                       os.path.join(out, "frame_0000.png")])


@case("demo/out-parent-is-a-file", "3 unwritable")
def _(fx, d):
    f = write(os.path.join(d, "somefile.txt"), "keep me")
    return Spec(fx.demo(os.path.join(f, "sub")), watch=[f])


@case("demo/out-under-proc", "3 unwritable")
def _(fx, d):
    return Spec(fx.demo("/proc/dreampose_sweep_demo"))


# ----------------------------------------------------------------------------------------------- convert

@case("convert/ok", "sanity")
def _(fx, d):
    out = os.path.join(d, "c.safetensors")
    return Spec(fx.convert(out), expect="ok", check=files_ok((safetensors_problem, out)))


@case("convert/out-is-the-vae-input", "1 data loss")
def _(fx, d):
    vae = shutil.copy(os.path.join(fx.auth, "vae_1.safetensors"), os.path.join(d, "vae.safetensors"))
    return Spec(fx.convert(vae, "--vae", vae, "--vae-config", os.path.join(fx.auth, "vae_config.json"), "--force"),
                watch=[vae])


@case("convert/out-exists-unrelated", "1 data loss")
def _(fx, d):
    keep = write(os.path.join(d, "mine.safetensors"), "precious")
    return Spec(fx.convert(keep), watch=[keep], msg="--force")


@case("convert/out-is-a-folder")
def _(fx, d):
    os.makedirs(os.path.join(d, "x.safetensors"))
    return Spec(fx.convert(os.path.join(d, "x.safetensors")))


@case("convert/out-wrong-extension")
def _(fx, d):
    return Spec(fx.convert(os.path.join(d, "c.pth")))


@case("convert/unet-0-byte-unet_epoch_20.pth", "7 misleading")
def _(fx, d):
    unet = write(os.path.join(d, "unet_epoch_20.pth"))
    shutil.copy(os.path.join(fx.auth, "adapter_1.pth"), os.path.join(d, "adapter_20.pth"))
    return Spec(fx.convert(os.path.join(d, "c.safetensors"), unet=unet), msg=r"empty|0 bytes")


@case("convert/unet-malicious-pickle", "6 pickle")
def _(fx, d):
    marker = os.path.join(d, "PWNED")
    unet = os.path.join(d, "unet_epoch_1.pth")
    make_evil(fx, unet, marker)
    shutil.copy(os.path.join(fx.auth, "adapter_1.pth"), d)
    return Spec(fx.convert(os.path.join(d, "c.safetensors"), unet=unet), check=no_file(marker, "the pickle's code ran"))


@case("convert/no-adapter-beside")
def _(fx, d):
    unet = shutil.copy(os.path.join(fx.auth, "unet_epoch_1.pth"), os.path.join(d, "unet_epoch_1.pth"))
    return Spec(fx.convert(os.path.join(d, "c.safetensors"), unet=unet))


@case("convert/unet-is-our-safetensors")
def _(fx, d):
    return Spec(fx.convert(os.path.join(d, "c.safetensors"), unet=fx.dp))


@case("convert/unet-config-not-json")
def _(fx, d):
    cmd = fx.convert(os.path.join(d, "c.safetensors"))
    cmd[cmd.index("--unet-config") + 1] = write(os.path.join(d, "cfg.json"), "{not json")
    return Spec(cmd)


@case("convert/unet-config-huge-channels", "4 limits")
def _(fx, d):
    with open(os.path.join(fx.auth, "unet_config.json")) as f:
        cfg = json.load(f)
    cfg["block_out_channels"] = [200000] * len(cfg["block_out_channels"])
    cmd = fx.convert(os.path.join(d, "c.safetensors"))
    cmd[cmd.index("--unet-config") + 1] = write(os.path.join(d, "cfg.json"), json.dumps(cfg))
    return Spec(with_ulimit(cmd, v=MEM_LIMIT_KB), timeout=HUGE_TIMEOUT)


@case("convert/ulimit-f-1024", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "c.safetensors")
    return Spec(with_ulimit(fx.convert(out), f=1024), absent=[out])


@case("convert/disk-full-tmpfs-1m", "3 unwritable")
def _(fx, d):
    if not fx.can_mount:
        return Spec([], skip="mount needs root")
    out = os.path.join(fx.mount(d, "full", size="1m"), "c.safetensors")
    return Spec(fx.convert(out), absent=[out])


# ----------------------------------------------------------------------------------------------- finetune-subject

@case("finetune-subject/out-is-its-dreampose-input", "1 data loss")
def _(fx, d):
    b = shutil.copy(fx.dp, os.path.join(d, "b.safetensors"))
    return Spec(fx.fsubj(b, dreampose=b), watch=[b])


@case("finetune-subject/out-is-its-dreampose-input-force", "1 data loss")
def _(fx, d):
    b = shutil.copy(fx.dp, os.path.join(d, "b.safetensors"))
    return Spec(fx.fsubj(b, "--force", dreampose=b), watch=[b])


@case("finetune-subject/out-exists-unrelated", "1 data loss")
def _(fx, d):
    keep = write(os.path.join(d, "mine.safetensors"), "precious")
    return Spec(fx.fsubj(keep), watch=[keep], msg="--force")


@case("finetune-subject/images-vs-poses-count")
def _(fx, d):
    return Spec(fx.fsubj(os.path.join(d, "s.safetensors"), poses=fx.poses))


@case("finetune-subject/corrupt-image", "6 training faults")
def _(fx, d):
    imgs = os.path.join(d, "imgs")
    write(os.path.join(imgs, "frame_0.png"), b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    return Spec(fx.fsubj(os.path.join(d, "s.safetensors"), images=imgs))


@case("finetune-subject/images-folder-without-images")
def _(fx, d):
    imgs = os.path.join(d, "imgs")
    write(os.path.join(imgs, "readme.txt"), "x")
    return Spec(fx.fsubj(os.path.join(d, "s.safetensors"), images=imgs))


@case("finetune-subject/pose-smaller-than-image")
def _(fx, d):
    poses = os.path.join(d, "p")
    write(os.path.join(poses, "frame_0_densepose.npy"), npy_bytes("<f4", (2, 16, 16), lambda n: b"\0" * 4 * n))
    out = os.path.join(d, "s.safetensors")
    return Spec(fx.fsubj(out, poses=poses), expect="either",
                check=lambda r: [p for p in [safetensors_problem(out)] if p] if r.rc == 0 else [])


@case("finetune-subject/lr-1e6", "5 silently accepted")
def _(fx, d):
    return Spec(fx.fsubj(os.path.join(d, "s.safetensors"), "--lr", "1e6"))


@case("finetune-subject/height-100032", "4 limits")
def _(fx, d):
    return Spec(fx.fsubj(os.path.join(d, "s.safetensors"), "--height", 100032), timeout=HUGE_TIMEOUT)


@case("finetune-subject/lora-rank-10**9", "4 limits")
def _(fx, d):
    return Spec(with_ulimit(fx.fsubj(os.path.join(d, "s.safetensors"), "--lora-rank", 10 ** 9), v=MEM_LIMIT_KB),
                timeout=HUGE_TIMEOUT)


@case("finetune-subject/batch-size-10**9", "4 limits")
def _(fx, d):
    return Spec(with_ulimit(fx.fsubj(os.path.join(d, "s.safetensors"), "--batch-size", 10 ** 9), v=MEM_LIMIT_KB),
                timeout=HUGE_TIMEOUT)


@case("finetune-subject/seed-2**64", "4 limits")
def _(fx, d):
    return Spec(fx.fsubj(os.path.join(d, "s.safetensors"), "--seed", 2 ** 64))


@case("finetune-subject/out-under-proc", "3 unwritable")
def _(fx, d):
    return Spec(fx.fsubj("/proc/dreampose_sweep.safetensors"))


@case("finetune-subject/ulimit-f-64", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "s.safetensors")
    return Spec(with_ulimit(fx.fsubj(out), f=64), absent=[out])


@case("finetune-subject/sigint-while-training", "Ctrl-C")
def _(fx, d):
    out = os.path.join(d, "s.safetensors")
    cmd = fx.fsubj(out, quiet=False)
    cmd[cmd.index("--steps") + 1] = "500"
    return Spec(cmd, sigint_after=r"finetune UNet", sigint_delay=2, rc=130, absent=[out])


# ----------------------------------------------------------------------------------------------- finetune-vae

@case("finetune-vae/ok-and-rerun-is-cached", "sanity")
def _(fx, d):
    out = os.path.join(d, "v.safetensors")
    subprocess.run(fx.fvae(out), env=ENV, capture_output=True, cwd=d)
    return Spec(fx.fvae(out), expect="ok", check=both(files_ok((safetensors_problem, out)),
                                                      lambda r: [] if "up to date" in r.stdout else
                                                      ["rerun of the same finetune was not reused"]))


@case("finetune-vae/out-is-its-dreampose-input", "1 data loss")
def _(fx, d):
    b = shutil.copy(fx.dp, os.path.join(d, "b.safetensors"))
    return Spec(fx.fvae(b, "--force", dreampose=b), watch=[b])


@case("finetune-vae/image-0-bytes")
def _(fx, d):
    return Spec(fx.fvae(os.path.join(d, "v.safetensors"), images=[write(os.path.join(d, "a.png"))]))


@case("finetune-vae/crop-min-scale-0")
def _(fx, d):
    return Spec(fx.fvae(os.path.join(d, "v.safetensors"), "--crop-min-scale", 0))


@case("finetune-vae/width-0")
def _(fx, d):
    return Spec(fx.fvae(os.path.join(d, "v.safetensors"), "--width", 0))


# ----------------------------------------------------------------------------------------------- bench

@case("bench/json-out-in-missing-folder", "3 unwritable")
def _(fx, d):
    out = os.path.join(d, "missing", "dir", "x.json")
    return Spec(fx.bench("--json-out", out), expect="either",
                check=lambda r: [p for p in [json_problem(out)] if p] if r.rc == 0 else [])


@case("bench/json-out-exists", "1 data loss")
def _(fx, d):
    keep = write(os.path.join(d, "x.json"), '{"mine": 1}')
    return Spec(fx.bench("--json-out", keep), watch=[keep], msg="--force")


@case("bench/json-out-is-dreampose-input-force", "1 data loss")
def _(fx, d):
    b = shutil.copy(fx.dp, os.path.join(d, "b.safetensors"))
    return Spec(fx.bench("--dreampose", b, "--json-out", b, "--force"), watch=[b])


@case("bench/json-out-parent-is-a-file", "3 unwritable")
def _(fx, d):
    f = write(os.path.join(d, "somefile.txt"), "keep")
    return Spec(fx.bench("--json-out", os.path.join(f, "x.json")), watch=[f])


@case("bench/json-out-under-proc", "3 unwritable")
def _(fx, d):
    return Spec(fx.bench("--json-out", "/proc/dreampose_sweep.json"))


@case("bench/ulimit-f-1", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "x.json")
    return Spec(with_ulimit(fx.bench("--json-out", out), f=1), absent=[out])


@case("bench/frames-not-multiple-of-batch")
def _(fx, d):
    cmd = fx.bench()
    cmd[cmd.index("--frames") + 1] = "3"
    cmd[cmd.index("--frames-per-batch") + 1] = "2"
    return Spec(cmd)


@case("bench/width-100032", "4 limits")
def _(fx, d):
    return Spec(fx.bench("--width", 100032), timeout=HUGE_TIMEOUT)


@case("bench/steps-1001-ddim (more than the 1000 train timesteps)")
def _(fx, d):
    cmd = fx.bench("--sampler", "ddim")
    cmd[cmd.index("--steps") + 1] = "1001"
    return Spec(cmd, expect="either", timeout=240)


@case("bench/finetune-lora-rank-10**7", "4 limits")
def _(fx, d):
    return Spec(with_ulimit(fx.bench("--finetune", "--finetune-steps", 2, "--lora-rank", 10 ** 7), v=MEM_LIMIT_KB),
                timeout=HUGE_TIMEOUT)


@case("bench/threads-100000")
def _(fx, d):
    cmd = fx.bench()
    cmd[cmd.index("--threads") + 1] = "100000"
    return Spec(cmd, expect="either", timeout=120)


# ----------------------------------------------------------------------------------------------- synth

@case("synth/preview-replaces-existing-file", "1 data loss")
def _(fx, d):
    photo = shutil.copy(fx.img, os.path.join(d, "holiday.png"))
    return Spec(fx.synth(os.path.join(d, "o"), "--preview", photo), watch=[photo], msg="--force|exists")


@case("synth/preview-is-a-frame-of-the-dataset", "same path, two outputs")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(fx.synth(out, "--preview", os.path.join(out, "test", "world_0000", "frame_0.png")),
                check=lambda r: ["the dataset's frame_0.png was replaced by the contact sheet"] if r.rc == 0 else [])


@case("synth/ok-and-rerun-keeps", "sanity")
def _(fx, d):
    out = os.path.join(d, "o")
    subprocess.run(fx.synth(out), env=ENV, capture_output=True, cwd=d)
    v = os.path.join(out, "test", "world_0000")
    return Spec(fx.synth(out), expect="ok", watch=[v], check=files_ok(
        (png_problem, os.path.join(v, "frame_0.png")), (npy_problem, os.path.join(v, "frame_1_densepose.npy")),
        (json_problem, os.path.join(v, "prepared.json"))))


@case("synth/folder-of-another-run-no-force", "1 data loss")
def _(fx, d):
    out = os.path.join(d, "o")
    subprocess.run(fx.synth(out, "--seed", 5), env=ENV, capture_output=True, cwd=d)
    return Spec(fx.synth(out), watch=[out], msg="--force")


@case("synth/size-100000", "4 limits")
def _(fx, d):
    return Spec(fx.synth(os.path.join(d, "o"), "--width", 100000, "--height", 100000), timeout=HUGE_TIMEOUT)


@case("synth/frames-10**9", "4 limits")
def _(fx, d):
    return Spec(with_ulimit(fx.synth(os.path.join(d, "o"), "--frames", 10 ** 9), v=MEM_LIMIT_KB),
                timeout=HUGE_TIMEOUT)


@case("synth/videos-10**12", "4 limits")
def _(fx, d):
    return Spec(with_ulimit(fx.synth(os.path.join(d, "o"), "--videos", 10 ** 12), v=MEM_LIMIT_KB),
                timeout=HUGE_TIMEOUT)


@case("synth/frames-0")
def _(fx, d):
    return Spec(fx.synth(os.path.join(d, "o"), "--frames", 0))


@case("synth/fps-negative")
def _(fx, d):
    return Spec(fx.synth(os.path.join(d, "o"), "--fps", -8))


@case("synth/seed-2**64", "4 limits")
def _(fx, d):
    return Spec(fx.synth(os.path.join(d, "o"), "--seed", 2 ** 64))


@case("synth/out-is-a-file")
def _(fx, d):
    f = write(os.path.join(d, "somefile.txt"), "keep")
    return Spec(fx.synth(f), watch=[f])


@case("synth/out-parent-is-a-file", "3 unwritable")
def _(fx, d):
    f = write(os.path.join(d, "somefile.txt"), "keep")
    return Spec(fx.synth(os.path.join(f, "sub")), watch=[f], not_msg=r"another synth run")


@case("synth/out-under-proc", "3 unwritable")
def _(fx, d):
    return Spec(fx.synth("/proc/dreampose_sweep_synth"), not_msg=r"free")


@case("synth/ulimit-f-4", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(with_ulimit(fx.synth(out), f=4), absent=[os.path.join(out, "test", "world_0000", "prepared.json")])


@case("synth/read-only-mount", "3 unwritable")
def _(fx, d):
    if not fx.can_mount:
        return Spec([], skip="mount needs root")
    return Spec(fx.synth(os.path.join(fx.mount(d, "ro", ro=True), "o")))


@case("synth/sigint-mid-run", "Ctrl-C")
def _(fx, d):
    out = os.path.join(d, "o")
    cmd = [a for a in fx.synth(out, "--videos", 400) if a != "--quiet"]

    def check(r: Result) -> list[str]:
        problems = []
        split = os.path.join(out, "test")
        for v in sorted(os.listdir(split)) if os.path.isdir(split) else []:
            marker = os.path.join(split, v, "prepared.json")
            if os.path.exists(marker):
                n = len([x for x in os.listdir(os.path.join(split, v)) if x.endswith(".png")])
                if n != 2:
                    problems.append(f"{v} has a marker but {n} frames")
        return problems
    return Spec(cmd, sigint_after=r"synth:.*\d+/400", sigint_delay=1.5, rc=130, check=check)


# ----------------------------------------------------------------------------------------------- prepare

@case("prepare/ok-unicode-source", "sanity")
def _(fx, d):
    src = os.path.join(d, "vidéos source")
    shutil.copytree(fx.video, os.path.join(src, "clip 1"))
    out = os.path.join(d, "prepared")
    v = os.path.join(out, "clip 1")
    return Spec(dp("prepare", src, "--out", out, "--quiet"), expect="ok", check=files_ok(
        (png_problem, os.path.join(v, "frame_2.png")), (npy_problem, os.path.join(v, "frame_2_densepose.npy")),
        (json_problem, os.path.join(v, "prepared.json"))))


@case("prepare/out-is-the-source", "1 data loss")
def _(fx, d):
    src = os.path.join(d, "src")
    shutil.copytree(fx.video, os.path.join(src, "v"))
    return Spec(dp("prepare", src, "--out", src, "--quiet"), watch=[src])


@case("prepare/out-holds-unrelated-frames", "1 data loss")
def _(fx, d):
    src = os.path.join(d, "src")
    shutil.copytree(fx.video, os.path.join(src, "v"))
    mine = os.path.join(d, "out", "v")
    os.makedirs(mine)
    for i in range(6):     # someone else's frames, more than the source has
        shutil.copy(os.path.join(fx.video, "frame_0.png"), os.path.join(mine, f"frame_{i}.png"))
        shutil.copy(os.path.join(fx.video, "frame_0_densepose.npy"), os.path.join(mine, f"frame_{i}_densepose.npy"))
    return Spec(dp("prepare", src, "--out", os.path.join(d, "out")), watch=[mine])


@case("prepare/all-nan-pose", "5 silently accepted")
def _(fx, d):
    src = os.path.join(d, "src", "v")
    shutil.copytree(fx.video, src)
    write(os.path.join(src, "frame_1_densepose.npy"), npy_bytes("<f4", (2, 64, 64), nan_f32))
    return Spec(dp("prepare", os.path.dirname(src), "--out", os.path.join(d, "out"), "--quiet"),
                absent=[os.path.join(d, "out", "v", "prepared.json")])


@case("prepare/pose-of-strings", "5 silently accepted")
def _(fx, d):
    src = os.path.join(d, "src", "v")
    shutil.copytree(fx.video, src)
    write(os.path.join(src, "frame_1_densepose.npy"),
          npy_bytes("<U4", (2, 64, 64), lambda n: ("abcd" * n).encode("utf-32-le")))
    return Spec(dp("prepare", os.path.dirname(src), "--out", os.path.join(d, "out"), "--quiet"),
                absent=[os.path.join(d, "out", "v", "prepared.json")])


@case("prepare/pose-0-bytes")
def _(fx, d):
    src = os.path.join(d, "src", "v")
    shutil.copytree(fx.video, src)
    write(os.path.join(src, "frame_1_densepose.npy"))
    return Spec(dp("prepare", os.path.dirname(src), "--out", os.path.join(d, "out"), "--quiet"),
                absent=[os.path.join(d, "out", "v", "prepared.json")])


@case("prepare/resume-over-corrupt-output-npy")
def _(fx, d):
    src = os.path.join(d, "src", "v")
    shutil.copytree(fx.video, src)
    out = os.path.join(d, "out")
    subprocess.run(dp("prepare", os.path.dirname(src), "--out", out, "--quiet"), env=ENV, capture_output=True, cwd=d)
    os.remove(os.path.join(out, "v", "prepared.json"))       # as if stopped before the marker
    write(os.path.join(out, "v", "frame_0_densepose.npy"), b"\x93NUMPY garbage")
    return Spec(dp("prepare", os.path.dirname(src), "--out", out, "--quiet"), expect="either",
                check=lambda r: [p for p in [npy_problem(os.path.join(out, "v", "frame_0_densepose.npy"))] if p]
                if r.rc == 0 else [])


@case("prepare/corrupt-frame-png", "6 training faults")
def _(fx, d):
    src = os.path.join(d, "src", "v")
    shutil.copytree(fx.video, src)
    write(os.path.join(src, "frame_1.png"), b"\x89PNG\r\n\x1a\nbroken")
    return Spec(dp("prepare", os.path.dirname(src), "--out", os.path.join(d, "out"), "--quiet"),
                absent=[os.path.join(d, "out", "v", "prepared.json")])


@case("prepare/size-100000", "4 limits")
def _(fx, d):
    return Spec(with_ulimit(dp("prepare", fx.data, "--out", os.path.join(d, "out"), "--width", 100000, "--height",
                               100000, "--quiet"), v=MEM_LIMIT_KB), timeout=HUGE_TIMEOUT)


@case("prepare/fps-and-every")
def _(fx, d):
    return Spec(dp("prepare", fx.data, "--out", os.path.join(d, "out"), "--fps", 4, "--every", 2))


@case("prepare/source-not-a-video")
def _(fx, d):
    return Spec(dp("prepare", fx.img, "--out", os.path.join(d, "out")))


@case("prepare/densepose-junk-file")
def _(fx, d):
    src = os.path.join(d, "src", "v")
    os.makedirs(src)
    shutil.copy(os.path.join(fx.video, "frame_0.png"), src)
    return Spec(dp("prepare", os.path.dirname(src), "--out", os.path.join(d, "out"), "--densepose",
                   write(os.path.join(d, "dp.torchscript"), b"junk"), "--device", "cpu"))


@case("prepare/ulimit-f-4", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "out")
    return Spec(with_ulimit(dp("prepare", fx.data, "--out", out, "--quiet"), f=4),
                absent=[os.path.join(out, "test", "world_0000", "prepared.json")])


# ----------------------------------------------------------------------------------------------- train

@case("train/out-holds-its-init-bundle", "1 data loss")
def _(fx, d):
    out = os.path.join(d, "models")
    init = shutil.copy(fx.dp, write(os.path.join(out, "dreampose.safetensors")))
    return Spec(fx.train(out, init=init), watch=[init])


@case("train/out-holds-unrelated-log", "1 data loss")
def _(fx, d):
    out = os.path.join(d, "o")
    log = write(os.path.join(out, "train_log.jsonl"), "my notes, not JSON\n")
    return Spec(fx.train(out), watch=[log])


@case("train/out-is-the-data-folder", "1 data loss")
def _(fx, d):
    data = os.path.join(d, "data")
    shutil.copytree(fx.data, data)
    return Spec(fx.train(data, data=data), watch=[data])


@case("train/existing-run-without-resume")
def _(fx, d):
    run = fx.copy_run(d)
    return Spec(fx.train(run), watch=[run])


@case("train/resume-newest-checkpoint-truncated", "6 training faults")
def _(fx, d):
    run = fx.copy_run(d)
    m = os.path.join(run, "checkpoints", "step_2", "model.safetensors")
    with open(m, "r+b") as f:
        f.truncate(os.path.getsize(m) // 2)
    cmd = fx.train(run, "--resume", "latest")
    cmd[cmd.index("--steps") + 1] = "3"
    return Spec(cmd, expect="ok", check=both(stderr_has(r"step_2.*(does not load|damaged|truncat)",
                                                        "no word about the damaged newest checkpoint"),
                                             files_ok((safetensors_problem,
                                                       os.path.join(run, "dreampose.safetensors")))))


@case("train/resume-all-checkpoints-truncated", "6 training faults")
def _(fx, d):
    run = fx.copy_run(d)
    for s in ("step_1", "step_2"):
        m = os.path.join(run, "checkpoints", s, "model.safetensors")
        with open(m, "r+b") as f:
            f.truncate(100)
    cmd = fx.train(run, "--resume", "latest")
    cmd[cmd.index("--steps") + 1] = "3"
    return Spec(cmd)


@case("train/resume-malicious-random-states-pickle", "6 pickle")
def _(fx, d):
    run = fx.copy_run(d)
    marker = os.path.join(d, "PWNED")
    make_evil(fx, os.path.join(run, "checkpoints", "step_2", "random_states_0.pkl"), marker)
    cmd = fx.train(run, "--resume", "latest")
    cmd[cmd.index("--steps") + 1] = "3"
    return Spec(cmd, expect="either", check=both(no_file(marker, "the pickle's code ran"),
                                                 lambda r: [] if r.rc != 0 or re.search(
                                                     r"random|rng|random_states|does not load", r.stderr, re.I)
                                                 else ["resumed without saying the RNG state was refused"]))


@case("train/resume-malicious-optimizer-pickle", "6 pickle")
def _(fx, d):
    run = fx.copy_run(d)
    marker = os.path.join(d, "PWNED")
    make_evil(fx, os.path.join(run, "checkpoints", "step_2", "optimizer.bin"), marker)
    cmd = fx.train(run, "--resume", "latest")
    cmd[cmd.index("--steps") + 1] = "3"
    return Spec(cmd, expect="either", check=no_file(marker, "the pickle's code ran"))


@case("train/resume-with-garbage-train-log")
def _(fx, d):
    run = fx.copy_run(d)
    with open(os.path.join(run, "train_log.jsonl"), "a") as f:
        f.write("{truncated line\n")
    cmd = fx.train(run, "--resume", "latest")
    cmd[cmd.index("--steps") + 1] = "3"
    return Spec(cmd, expect="either")


@case("train/resume-latest-new-lr", "6 training faults")
def _(fx, d):
    run = fx.copy_run(d)
    cmd = fx.train(run, "--resume", "latest", "--lr", "1e-3")
    cmd[cmd.index("--steps") + 1] = "3"
    return Spec(cmd, expect="ok", check=stderr_has(r"lr .*1e-03|lr .*0\.001", "the changed lr is not reported"))


@case("train/resume-path-is-a-file")
def _(fx, d):
    return Spec(fx.train(os.path.join(d, "o"), "--resume", fx.img))


@case("train/corrupt-frame-strict", "6 training faults")
def _(fx, d):
    data = os.path.join(d, "data")
    shutil.copytree(fx.data, data)
    write(os.path.join(data, "test", "world_0000", "frame_1.png"), b"\x89PNG\r\n\x1a\nbroken")
    return Spec(fx.train(os.path.join(d, "o"), "--strict", data=data))


@case("train/data-is-a-file")
def _(fx, d):
    return Spec(fx.train(os.path.join(d, "o"), data=fx.img))


@case("train/lr-2")
def _(fx, d):
    return Spec(fx.train(os.path.join(d, "o"), "--lr", 2))


@case("train/height-65536", "4 limits")
def _(fx, d):
    return Spec(with_ulimit(fx.train(os.path.join(d, "o"), "--height", 65536), v=MEM_LIMIT_KB), timeout=HUGE_TIMEOUT)


@case("train/batch-not-divisible")
def _(fx, d):
    cmd = fx.train(os.path.join(d, "o"))
    cmd[cmd.index("--batch-size") + 1] = "3"
    cmd[cmd.index("--micro-batch") + 1] = "2"
    return Spec(cmd)


@case("train/mixed-precision-fp16-on-cpu")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(fx.train(out, "--mixed-precision", "fp16"), expect="either",
                check=lambda r: [p for p in [safetensors_problem(os.path.join(out, "dreampose.safetensors"))] if p]
                if r.rc == 0 else [])


@case("train/debug-dir-is-a-file")
def _(fx, d):
    f = write(os.path.join(d, "somefile.txt"), "keep")
    return Spec(fx.train(os.path.join(d, "o"), "--debug-dir", f), watch=[f])


@case("train/out-under-proc", "3 unwritable")
def _(fx, d):
    return Spec(fx.train("/proc/dreampose_sweep_train"))


@case("train/ulimit-f-512", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(with_ulimit(fx.train(out), f=512), absent=[os.path.join(out, "dreampose.safetensors")])


@case("train/disk-full-tmpfs-2m", "3 unwritable")
def _(fx, d):
    if not fx.can_mount:
        return Spec([], skip="mount needs root")
    out = os.path.join(fx.mount(d, "full", size="2m"), "o")
    return Spec(fx.train(out), absent=[os.path.join(out, "dreampose.safetensors")])


@case("train/sigint-while-training", "Ctrl-C")
def _(fx, d):
    out = os.path.join(d, "o")
    cmd = fx.train(out, "--save-every", 1, "--log-every", 1, quiet=False)
    cmd[cmd.index("--steps") + 1] = "300"
    return Spec(cmd, sigint_after=r"train:.*\s[1-9]\d*/300", sigint_delay=0.5, rc=130,
                absent=[os.path.join(out, "dreampose.safetensors")])


# ----------------------------------------------------------------------------------------------- eval

@case("eval/ok", "sanity")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(fx.eval(out, "--save-frames"), expect="ok", check=files_ok(
        (json_problem, os.path.join(out, "metrics.json"))))


@case("eval/out-is-the-data-folder", "1 data loss")
def _(fx, d):
    data = os.path.join(d, "data")
    shutil.copytree(fx.data, data)
    return Spec(fx.eval(data, data=data), watch=[data])


@case("eval/out-holds-unrelated-metrics", "1 data loss")
def _(fx, d):
    keep = write(os.path.join(d, "o", "metrics.json"), '{"mine": 1}')
    return Spec(fx.eval(os.path.dirname(keep)), watch=[keep], msg="--force")


@case("eval/out-under-proc", "3 unwritable")
def _(fx, d):
    return Spec(fx.eval("/proc/dreampose_sweep_eval"))


@case("eval/width-100032", "4 limits")
def _(fx, d):
    cmd = fx.eval(os.path.join(d, "o"))
    cmd[cmd.index("--width") + 1] = "100032"
    return Spec(cmd, timeout=HUGE_TIMEOUT, not_msg=r"must be a multiple of 64: give --width")


@case("eval/width-not-multiple-of-64")
def _(fx, d):
    cmd = fx.eval(os.path.join(d, "o"))
    cmd[cmd.index("--width") + 1] = "100"
    return Spec(cmd)


@case("eval/key-frame-past-the-end")
def _(fx, d):
    return Spec(fx.eval(os.path.join(d, "o"), "--key-frame", 7))


@case("eval/max-frames-1")
def _(fx, d):
    cmd = fx.eval(os.path.join(d, "o"))
    cmd[cmd.index("--max-frames") + 1] = "1"
    return Spec(cmd)


@case("eval/ablation-without-full")
def _(fx, d):
    cmd = [a for a in fx.eval(os.path.join(d, "o")) if a not in ("--dreampose", fx.dp)]
    return Spec(cmd + ["--ablation", f"clip={fx.dp}"])


@case("eval/dreampose-0-bytes")
def _(fx, d):
    return Spec(fx.eval(os.path.join(d, "o"), dreampose=write(os.path.join(d, "w.safetensors"))))


@case("eval/vgg-weights-junk")
def _(fx, d):
    return Spec(fx.eval(os.path.join(d, "o"), "--vgg-weights", write(os.path.join(d, "vgg.pth"), b"junk")))


@case("eval/data-without-videos")
def _(fx, d):
    os.makedirs(os.path.join(d, "empty"))
    return Spec(fx.eval(os.path.join(d, "o"), data=os.path.join(d, "empty")))


@case("eval/finetune-lr-1e6", "5 silently accepted")
def _(fx, d):
    return Spec(fx.eval(os.path.join(d, "o"), "--finetune-steps", 1, "--finetune-lr", "1e6"))


@case("eval/steps-1001-ddim (more than the 1000 train timesteps)")
def _(fx, d):
    cmd = fx.eval(os.path.join(d, "o"), "--sampler", "ddim")
    cmd[cmd.index("--steps") + 1] = "1001"
    return Spec(cmd, expect="either", timeout=240)


@case("eval/ulimit-f-4-save-frames", "2 unchecked writes")
def _(fx, d):
    out = os.path.join(d, "o")
    return Spec(with_ulimit(fx.eval(out, "--save-frames"), f=4), absent=[os.path.join(out, "metrics.json")])


# ----------------------------------------------------------------------------------------------- batch
# (a command added during this review: animate jobs from a JSON manifest; skipped where it does not exist)

def batch_cmd(fx, out: str, manifest: str, *extra) -> list[str]:
    return dp("batch", "--manifest", manifest, "--out", out, "--dreampose", fx.dp, "--width", 64, "--height", 64,
              "--steps", 1, "--device", "cpu", "--threads", 1, "--quiet", *extra)


def manifest(d: str, jobs, name: str = "jobs.json") -> str:
    return write(os.path.join(d, name), json.dumps({"jobs": jobs}))


def has_batch() -> bool:
    return os.path.isfile(os.path.join(REPO, "dreampose", "cli", "batch.py"))


@case("batch/ok-two-jobs", "sanity")
def _(fx, d):
    if not has_batch():
        return Spec([], skip="no batch command in this tree")
    m = manifest(d, [{"name": "a", "image": fx.img, "poses": fx.poses}, {"name": "b", "image": fx.img,
                                                                          "poses": fx.poses, "seed": 3}])
    out = os.path.join(d, "o")
    return Spec(batch_cmd(fx, out, m), expect="ok",
                check=lambda r: frames_problems(os.path.join(out, "a"), 3) + frames_problems(os.path.join(out, "b"), 3)
                + [p for p in [json_problem(os.path.join(out, "batch.json"))] if p])


@case("batch/manifest-not-json")
def _(fx, d):
    if not has_batch():
        return Spec([], skip="no batch command in this tree")
    return Spec(batch_cmd(fx, os.path.join(d, "o"), write(os.path.join(d, "jobs.json"), "{oops")))


@case("batch/manifest-is-its-own-report (batch.json in --out)", "1 data loss")
def _(fx, d):
    if not has_batch():
        return Spec([], skip="no batch command in this tree")
    out = os.path.join(d, "o")
    m = manifest(out, [{"name": "a", "image": fx.img, "poses": fx.poses}], name="batch.json")
    return Spec(batch_cmd(fx, out, m), watch=[m])


@case("batch/job-out-is-its-poses-folder", "1 data loss")
def _(fx, d):
    if not has_batch():
        return Spec([], skip="no batch command in this tree")
    poses = pose_folder(fx, d)                       # d/poses; the job "poses" writes to d/poses
    m = manifest(d, [{"name": "poses", "image": fx.img, "poses": poses}])
    return Spec(batch_cmd(fx, d, m), watch=[poses])


@case("batch/job-image-inside-its-out-with-force", "1 data loss")
def _(fx, d):
    if not has_batch():
        return Spec([], skip="no batch command in this tree")
    out = os.path.join(d, "o")
    img = shutil.copy(fx.img, write(os.path.join(out, "a", "frame_0000.png")))
    m = manifest(d, [{"name": "a", "image": img, "poses": fx.poses}])
    return Spec(batch_cmd(fx, out, m, "--force"), watch=[img])


@case("batch/duplicate-job-names")
def _(fx, d):
    if not has_batch():
        return Spec([], skip="no batch command in this tree")
    m = manifest(d, [{"name": "a", "image": fx.img, "poses": fx.poses}] * 2)
    return Spec(batch_cmd(fx, os.path.join(d, "o"), m))


@case("batch/job-name-escapes-out")
def _(fx, d):
    if not has_batch():
        return Spec([], skip="no batch command in this tree")
    m = manifest(d, [{"name": "../escaped", "image": fx.img, "poses": fx.poses}])
    return Spec(batch_cmd(fx, os.path.join(d, "o"), m), absent=[os.path.join(d, "escaped")])


@case("batch/job-steps-0-and-bad-pose")
def _(fx, d):
    if not has_batch():
        return Spec([], skip="no batch command in this tree")
    m = manifest(d, [{"name": "a", "image": fx.img, "poses": fx.poses, "steps": 0},
                     {"name": "b", "image": fx.img, "poses": pose_folder(fx, d, b"")}])
    return Spec(batch_cmd(fx, os.path.join(d, "o"), m))


# ============================================================================================ running

def _reader(stream, sink: list, event: threading.Event | None, pattern: str | None):
    """Collect a pipe as it comes (progress bars redraw with \\r, not new lines), and set ``event`` once the
    text so far matches ``pattern``."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    recent = ""
    fd = stream.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        text = decode(chunk)
        sink.append(text)
        if event is not None and pattern and not event.is_set():
            recent = (recent + text)[-16384:]
            if re.search(pattern, recent):
                event.set()
    stream.close()


def run_case(name: str, klass: str, builder, fx: Fixtures, root: str, index: int) -> Result:
    d = os.path.join(root, "cases", f"{index:03d}")
    os.makedirs(d)
    res = Result(name, "", dir=d)
    mounts_before = _mounts_under(d)
    try:
        spec = builder(fx, d)
    except Exception as exc:    # noqa: BLE001  (a case whose set-up fails is reported, not fatal)
        res.verdict, res.reasons = "SKIP", [f"set-up failed: {type(exc).__name__}: {exc}"]
        return res
    if spec.skip:
        res.verdict, res.reasons = "SKIP", [spec.skip]
        return res
    spec.limit = spec.limit or klass.startswith("4")
    res.command = display(spec.cmd, root)
    before = snapshot(spec.watch)
    t0 = time.time()
    proc = subprocess.Popen(spec.cmd, cwd=d, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out_lines, err_lines = [], []
    hit = threading.Event()
    threads = [threading.Thread(target=_reader, args=(proc.stdout, out_lines, None, None), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, err_lines, hit, spec.sigint_after), daemon=True)]
    for t in threads:
        t.start()
    sent = False
    deadline = t0 + spec.timeout
    while proc.poll() is None and time.time() < deadline:
        if spec.sigint_after and not sent and hit.wait(0.2):
            time.sleep(spec.sigint_delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
            sent = True
        elif not spec.sigint_after or sent:
            time.sleep(0.2)
    if proc.poll() is None:
        res.timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for t in threads:
        t.join(5)
    res.seconds = time.time() - t0
    res.rc = proc.returncode
    res.stdout, res.stderr = "".join(out_lines), "".join(err_lines)
    res.traceback = TRACEBACK in res.stderr
    res.reasons = judge(spec, res, before, sent)
    res.verdict = "DEFECT" if res.reasons else "OK"
    for m in reversed(_mounts_under(d)):
        if m not in mounts_before:
            subprocess.run(["umount", "-l", m], capture_output=True)
    return res


def judge(spec: Spec, res: Result, before: dict, sent: bool) -> list[str]:
    reasons = []
    if res.timed_out:
        if not spec.slow_ok:
            reasons.append(f"still running after {spec.timeout} s: no limit checked before heavy work")
    elif res.rc is not None and res.rc < 0:
        reasons.append(f"killed by signal {-res.rc}")
    if res.traceback:
        last = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        reasons.append("Python traceback" + (f" ({last[-1].strip()[:120]})" if last else ""))
    if spec.sigint_after and not sent:
        reasons.append("the run ended before the point where Ctrl-C was to be sent")
    if spec.rc is not None and not res.timed_out and res.rc != spec.rc and sent:
        reasons.append(f"exit {res.rc} after Ctrl-C, expected {spec.rc}")
    elif spec.expect == "fail" and res.rc == 0:
        reasons.append("exit 0: the bad input or fault was accepted")
    elif spec.expect == "ok" and res.rc != 0 and not res.timed_out:
        reasons.append(f"exit {res.rc} on an acceptable input")
    failed = res.rc not in (0, None)
    if failed and not res.timed_out and not res.traceback:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "|" not in ln and "it/s" not in ln]
        errors = [ln for ln in lines if re.search(r"error|failed|interrupted|usage:", ln, re.I)]
        if not errors:
            reasons.append("failed without an error message")
        text = "\n".join(errors)
        if spec.msg and not re.search(spec.msg, res.stderr, re.I):
            reasons.append(f"message does not say what to do (expected /{spec.msg}/)")
        if spec.not_msg and re.search(spec.not_msg, text, re.I):
            reasons.append(f"misleading message (matches /{spec.not_msg}/)")
        if re.search(r"nothing was written under a final name that is not complete", text):
            reasons.append("caught only by the generic I/O-error fallback (exit 1), not by the input/destination "
                           "checks")
        if spec.limit and re.search(r"out of memory|MemoryError|Cannot allocate|Unable to allocate|"
                                    r"DefaultCPUAllocator", res.stderr, re.I):
            reasons.append("no limit checked before the work: it ran out of memory instead")
        elif spec.limit and res.seconds > 40:
            reasons.append(f"refused only after {res.seconds:.0f} s of work: no limit checked up front")
    after = snapshot(spec.watch)
    changed = sorted(p for p in before if before[p] != "absent" and before[p] != after.get(p))
    if changed:
        reasons.append("pre-existing file(s) changed: " + ", ".join(display_path(p, res.dir) for p in changed[:4])
                       + (f" (+{len(changed) - 4})" if len(changed) > 4 else ""))
    left = leftovers(res.dir)
    if left:
        reasons.append("temporary files left: " + ", ".join(left[:3]))
    if failed or res.timed_out:
        partial = [p for p in spec.absent if os.path.exists(p)]
        if partial:
            reasons.append("partial outputs left: " + ", ".join(display_path(p, res.dir) for p in partial))
    if spec.check is not None:
        try:
            reasons += spec.check(res)
        except Exception as exc:   # noqa: BLE001
            reasons.append(f"output check failed: {type(exc).__name__}: {exc}")
    return reasons


def _mounts_under(d: str) -> list[str]:
    try:
        with open("/proc/mounts") as f:
            return [line.split()[1] for line in f if line.split()[1].startswith(d)]
    except OSError:
        return []


def display_path(p: str, d: str) -> str:
    return os.path.relpath(p, d) if p.startswith(d) else p


def display(cmd: list[str], root: str) -> str:
    text = shlex.join(cmd).replace(PY + " -m dreampose", "python -m dreampose")
    return text.replace(root, "$T").replace(DEMO_BUNDLE, "dreampose/assets/demo_dreampose.safetensors")


_OUTPUT_NAMES = re.compile(r"(dreampose_demo|dreampose_run\.json|metrics\.(json|md)|frame_\d+\.png|\.tmp-|"
                           r"\.safetensors$|train_log\.jsonl)")


def repo_outputs() -> set[str]:
    """Untracked files in the repository that look like a command's output (the cases run in their own
    folders, so one appearing here means a command wrote where it was not asked to). Other untracked or
    modified files are ignored: people may be working in the repository meanwhile."""
    p = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"], cwd=REPO,
                       capture_output=True, text=True)
    return {ln[3:] for ln in p.stdout.splitlines() if ln[:2] in ("??", "!!") and _OUTPUT_NAMES.search(ln)
            and not ln[3:].startswith(("out/", ".venv/"))}


def tail(text: str, n: int = 4) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln
             and "s/it]" not in ln and not re.match(r"^\s*\w[\w +]*:\s+\d+%\|", ln)]
    return lines[-n:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="run only the cases whose name contains this (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--json", help="write every result as JSON here")
    ap.add_argument("--report", help="write a Markdown list of the defects (command, stderr tail) here")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)
    chosen = [(i, c) for i, c in enumerate(CASES) if not args.only or any(s in c[0] for s in args.only)]
    if args.list:
        for i, (name, klass, _) in chosen:
            print(f"{i:3d}  {name}  [{klass}]")
        return 0
    if not chosen:
        print("no case matches", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="dreampose_fault_sweep_")
    git_before = repo_outputs()
    t0 = time.time()
    results: list[Result] = []
    try:
        fx = Fixtures(os.path.join(root, "fx"))
        print(f"building inputs in {fx.root} …", flush=True)
        fx.build()
        print(fx.log[-1], flush=True)
        dp_before = sha(DEMO_BUNDLE)
        fixture_before = snapshot([fx.root])

        def one(item):
            i, (name, klass, builder) = item
            r = run_case(name, klass, builder, fx, root, i)
            r.name = f"{name}"
            mark = {"OK": "ok", "DEFECT": "DEFECT", "SKIP": "skip"}[r.verdict]
            print(f"[{i:3d}] {mark:6s} {name} ({r.seconds:.0f} s, exit {r.rc})" +
                  (f": {'; '.join(r.reasons)}" if r.reasons and r.verdict != "OK" else ""), flush=True)
            return i, klass, r

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = list(pool.map(one, chosen))
        done.sort(key=lambda t: t[0])
        results = [r for _, _, r in done]
        klasses = {r.name: k for _, k, r in done}
        global_problems = []
        if sha(DEMO_BUNDLE) != dp_before:
            global_problems.append("the shipped demo bundle was changed")
        fixture_after = snapshot([fx.root])
        changed = [p for p in fixture_before if fixture_before[p] != fixture_after.get(p)]
        if changed:
            global_problems.append("shared inputs changed: " + ", ".join(display_path(p, fx.root) for p in changed[:5]))
        new = sorted(repo_outputs() - git_before)
        if new:
            global_problems.append("outputs appeared in the repository: " + ", ".join(new[:5]))
    finally:
        for m in reversed(_mounts_under(root)):
            subprocess.run(["umount", "-l", m], capture_output=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    width = max(len(r.name) for r in results)
    print()
    print(f"{'case':<{width}}  {'exit':>4}  tb  {'s':>4}  verdict  reason")
    print("-" * (width + 40))
    for r in results:
        print(f"{r.name:<{width}}  {str(r.rc):>4}  {'Y' if r.traceback else '-':>2}  {r.seconds:4.0f}  "
              f"{r.verdict:<7}  {'; '.join(r.reasons) if r.verdict != 'OK' else ''}")
    totals = {v: sum(r.verdict == v for r in results) for v in ("OK", "DEFECT", "SKIP")}
    print()
    print(f"total {len(results)} cases: {totals['OK']} OK, {totals['DEFECT']} DEFECT, {totals['SKIP']} SKIP "
          f"in {time.time() - t0:.0f} s")
    for p in global_problems:
        print(f"GLOBAL DEFECT: {p}")
    if args.keep:
        print(f"kept {root}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"totals": totals, "global": global_problems,
                       "cases": [dict(name=r.name, klass=klasses[r.name], command=r.command, rc=r.rc,
                                      traceback=r.traceback, timed_out=r.timed_out, seconds=round(r.seconds, 1),
                                      verdict=r.verdict, reasons=r.reasons, stderr_tail=tail(r.stderr, 8),
                                      stdout_tail=tail(r.stdout, 3)) for r in results]}, f, indent=1)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            f.write(f"# Fault sweep: {totals['OK']} OK, {totals['DEFECT']} DEFECT, {totals['SKIP']} SKIP "
                    f"of {len(results)}\n\n")
            for r in results:
                if r.verdict != "DEFECT":
                    continue
                f.write(f"## {r.name}\n\n```\n{r.command}\n```\n\nexit {r.rc}; {'; '.join(r.reasons)}\n\n")
                f.write("stderr (last lines):\n\n```\n" + "\n".join(tail(r.stderr, 6)) + "\n```\n\n")
    return 1 if totals["DEFECT"] or global_problems else 0


if __name__ == "__main__":
    sys.exit(main())
