"""Faults and bad destinations, as a user meets them: a full or read-only disk, a file-size limit, an
interrupt, an output that would destroy an input or someone else's file, absurd sizes and seeds.

Every case must end in one clear line and a non-zero exit, with nothing half-written under a final
name and no temporary file left behind. Real faults where the machine allows them: a small tmpfs
(full) and a read-only tmpfs need ``mount`` (root in a container that permits it; skipped with the
reason otherwise), the size limit is ``RLIMIT_FSIZE`` in a child process (``ulimit -f``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from dreampose.cli import main as cli
from dreampose.errors import DreamPoseError
from dreampose.files.atomic import atomic_save_safetensors, output_set, write_text_atomic
from dreampose.pipeline.video import save_video, write_gif
from dreampose.settings import MAX_SEED, SamplingOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H, FRAMES = 128, 192, 2


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


def leftovers(folder) -> list[str]:
    """Temporary files a writer left behind (the atomic writers' ``.tmp-*`` names)."""
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, n) for n in names if n.startswith(".tmp-")]
    return found


@contextlib.contextmanager
def tmpfs(path, size: str = "64k", read_only: bool = False):
    """A real small (or read-only) file system at ``path``; skips the test where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the full/read-only disk cases need it")
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not permitted'}); the full/read-only "
                    "disk cases need it")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dreampose.data.synthetic import synthetic_key_frame, synthetic_uv_sequence

    folder = tmp_path_factory.mktemp("fault_inputs")
    image = str(folder / "key.png")
    Image.fromarray(synthetic_key_frame(H, W).permute(1, 2, 0).numpy()).save(image)
    poses = folder / "poses"
    poses.mkdir()
    for i, uv in enumerate(synthetic_uv_sequence(FRAMES, H, W).numpy()):
        np.save(poses / f"frame_{i}_densepose.npy", uv.astype(np.float32))
    return {"image": image, "poses": str(poses)}


def animate_args(model, clip, inputs, out, *extra):
    return ["animate", "--dreampose", model, "--clip", clip, "--image", inputs["image"], "--poses", inputs["poses"],
            "--width", W, "--height", H, "--steps", 2, "--sampler", "ddim", "--out", out, "--quiet", "--threads", 1,
            *extra]


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to load weights fails the test: destination errors must come before any work."""
    import dreampose.loaders.load

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the destination was checked")

    import dreampose.demo.model             # imported here, so it binds the real loader and is patched below

    monkeypatch.setattr(dreampose.loaders.load, "load_dreampose", refuse)
    monkeypatch.setattr(dreampose.demo.model, "load_dreampose", refuse)
    monkeypatch.setattr(dreampose.loaders.load, "convert_authors_checkpoint", refuse)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"dreampose {command}: error:"), err
    return err


# ------------------------------------------------------------------------------ one output mechanism

def test_an_output_set_appears_whole_or_not_at_all(tmp_path):
    frames = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    for failure in (DreamPoseError("bad"), KeyboardInterrupt()):
        out = tmp_path / type(failure).__name__
        with pytest.raises(type(failure)), output_set():
            save_video(frames, str(out))
            write_gif(frames, str(out / "a.gif"))
            assert sorted(os.listdir(out)) and not any(n.endswith(".png") and not n.startswith(".tmp-")
                                                        for n in os.listdir(out))   # nothing final yet
            raise failure
        assert os.listdir(out) == []
    out = tmp_path / "ok"
    with output_set():
        with output_set():     # a nested set joins the outer one
            pngs, mp4 = save_video(frames, str(out))
        assert not os.path.exists(pngs[0])
        write_text_atomic(str(out / "report.json"), "{}")
    assert sorted(os.listdir(out)) == ["dreampose.mp4", "frame_0000.png", "frame_0001.png", "frame_0002.png",
                                       "report.json"]


_LIMITED_WRITE = r"""
import resource, sys
import numpy as np
sys.path.insert(0, {repo!r})
from dreampose.errors import DreamPoseError
from dreampose.pipeline.video import save_video
frames = np.random.default_rng(0).random((3, 64, 64, 3)).astype(np.float32) * {scale}
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    save_video(frames, {out!r})
except DreamPoseError as exc:
    print(exc)
    sys.exit(2)
"""


@pytest.mark.parametrize("scale, limit, message", [
    (1.0, 4096, "ulimit -f"),                         # Python's own write of a PNG fails: EFBIG
    (0.0, 600, "the video holds 0 of 3 frames"),      # flat PNGs fit; OpenCV's MP4 writer fails silently
])
def test_a_write_cut_short_by_the_size_limit_is_an_error(tmp_path, scale, limit, message):
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-c", _LIMITED_WRITE.format(repo=REPO, scale=scale, limit=limit, out=out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stdout and "Nothing was left under that name" in proc.stdout
    assert not [n for n in os.listdir(out) if n.endswith((".png", ".mp4"))] or scale == 0.0
    assert leftovers(out) == []
    if scale == 0.0:     # save_video alone is not a set: the PNGs before the video are complete files
        assert all(Image.open(os.path.join(out, n)).size == (64, 64) for n in os.listdir(out))


def test_animate_under_a_file_size_limit_exits_non_zero_and_leaves_nothing(tmp_path, tiny_dreampose_file,
                                                                           tiny_clip_folder, inputs):
    out = tmp_path / "out"
    limit = 16 * 1024        # the tiny model's frames are larger than this; its weights are only read

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "dreampose", *map(str, animate_args(
        tiny_dreampose_file, tiny_clip_folder, inputs, out))], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
        preexec_fn=limited, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith("dreampose animate: error: could not write")
    assert "ulimit -f" in lines[-1]
    assert sorted(os.listdir(out)) == []      # no frame, no video, no run record, no temporary file


def default_sigint() -> None:
    """In the child, before exec: Ctrl-C as in a terminal. A test run started in the background (``cmd &``
    without job control) ignores SIGINT, children inherit that, and Python then installs no KeyboardInterrupt
    handler: the Ctrl-C tests would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_sampling_exits_130_and_writes_nothing(tmp_path, tiny_dreampose_file, tiny_clip_folder,
                                                              inputs):
    out = tmp_path / "out"
    args = [a for a in map(str, animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, out, "--steps", 400))
            if a != "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "dreampose", *args], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": REPO}, text=True,
                            preexec_fn=default_sigint)
    seen = ""
    try:
        while "sampling" not in seen:      # the sampling bar has started
            chunk = proc.stderr.read(1)
            assert chunk, "animate ended before sampling"
            seen += chunk
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "dreampose animate: interrupted" in rest and "Traceback" not in rest
    assert not os.path.exists(out) or os.listdir(out) == []


CTRL_C_MID_WRITE = r"""
import os, signal, sys
import numpy as np
from dreampose.files import atomic
from dreampose.pipeline.video import save_video
out, phase, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]
real = {"fsync": os.fsync, "replace": os.replace}[phase]


def interrupting(*args):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C exactly while the files are being flushed / renamed
    return real(*args)


setattr(os, phase, interrupting)
frames = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
try:
    with atomic.output_set():
        save_video(frames, out)
        atomic.write_text_atomic(os.path.join(out, "report.json"), "{}")
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("phase, at", [("fsync", 1), ("fsync", 3), ("replace", 1), ("replace", 4)])
def test_ctrl_c_while_a_set_is_flushed_or_renamed_leaves_all_or_nothing(tmp_path, phase, at):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", CTRL_C_MID_WRITE, str(out), phase, str(at)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120,
                          preexec_fn=default_sigint)
    assert proc.returncode == 0 and proc.stdout.strip() == "interrupted", proc.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".tmp-")], names      # no temporary file left behind
    whole = ["dreampose.mp4", "frame_0000.png", "frame_0001.png", "frame_0002.png", "report.json"]
    # while flushing: nothing appears; while renaming: the interrupt waits until the whole set is in place
    assert names == ([] if phase == "fsync" else whole), names


# ------------------------------------------------------------------------------ full and read-only disks

def test_a_full_disk_gives_a_clear_error_and_no_partial_file(tmp_path):
    with tmpfs(tmp_path / "small", size="64k") as small:
        with pytest.raises(DreamPoseError, match="no space is left on the device"):
            atomic_save_safetensors({"w": torch.zeros(64, 1024)}, os.path.join(small, "model.safetensors"), {})
        frames = np.random.default_rng(0).random((4, 128, 128, 3)).astype(np.float32)   # ~50 KB per PNG
        with pytest.raises(DreamPoseError, match="no space is left"), output_set():
            save_video(frames, os.path.join(small, "video"))
        assert os.listdir(small) in ([], ["video"]) and leftovers(small) == []
        assert not os.path.exists(os.path.join(small, "video")) or os.listdir(os.path.join(small, "video")) == []


def test_convert_checks_free_space_before_any_work(tmp_path, authors_release, no_weight_loading, capsys):
    with tmpfs(tmp_path / "small", size="16k") as small:
        assert run_cli("convert", authors_release.unet_path, "--out", os.path.join(small, "x.safetensors")) == 2
        err = one_error_line(capsys, "convert")
        assert "MiB are needed and only" in err and os.listdir(small) == []


@pytest.mark.parametrize("command", ["animate", "convert", "bench", "finetune-vae", "synth"])
def test_a_read_only_destination_is_refused_before_any_work(command, tmp_path, tiny_dreampose_file,
                                                            tiny_clip_folder, inputs, authors_release,
                                                            no_weight_loading, capsys):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        target = os.path.join(ro, "sub", "out")
        args = {
            "animate": animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, target),
            "convert": ["convert", authors_release.unet_path, "--out", target + ".safetensors"],
            "bench": ["bench", "--json-out", target + ".json", "--quiet"],
            "finetune-vae": ["finetune-vae", "--dreampose", tiny_dreampose_file, "--clip", tiny_clip_folder,
                             "--images", inputs["image"], "--out", target + ".safetensors", "--quiet"],
            "synth": ["synth", "--out", target, "--videos", 1, "--frames", 2, "--quiet"],
        }[command]
        assert run_cli(*args) == 2
        assert "read-only file system" in one_error_line(capsys, command)


# ------------------------------------------------------------------------------ nothing replaced unasked

def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("command", ["finetune-subject", "finetune-vae"])
def test_a_finetune_never_writes_over_its_own_input(command, tmp_path, tiny_dreampose_file, tiny_clip_folder,
                                                    inputs, no_weight_loading, capsys):
    model = tmp_path / "base.safetensors"
    model.write_bytes(_bytes(tiny_dreampose_file))
    before = _bytes(model)
    poses = ["--poses", inputs["poses"]] if command == "finetune-subject" else []
    for force in ([], ["--force"]):       # not even with --force
        assert run_cli(command, "--dreampose", model, "--clip", tiny_clip_folder, "--images", inputs["image"],
                       *poses, "--out", model, "--quiet", *force) == 2
        assert "is the input --dreampose" in one_error_line(capsys, command)
    assert _bytes(model) == before


def test_an_unrelated_existing_file_is_replaced_only_with_force(tmp_path, authors_release, tiny_unet_config,
                                                                capsys):
    cfg = tmp_path / "unet.json"
    cfg.write_text(json.dumps(tiny_unet_config))
    out = tmp_path / "precious.safetensors"
    out.write_bytes(b"someone's model")
    assert run_cli("convert", authors_release.unet_path, "--unet-config", cfg, "--out", out) == 2
    assert "already exists" in one_error_line(capsys, "convert") and out.read_bytes() == b"someone's model"
    assert run_cli("convert", authors_release.unet_path, "--out", authors_release.unet_path) == 2
    assert "is the input unet" in one_error_line(capsys, "convert")
    assert run_cli("convert", authors_release.unet_path, "--unet-config", cfg, "--out", out, "--force") == 0
    assert out.read_bytes()[:8] != b"someone'"
    capsys.readouterr()

    report = tmp_path / "notes.json"
    report.write_text("my notes")
    assert run_cli("bench", "--width", 64, "--height", 64, "--frames", 2, "--frames-per-batch", 2, "--steps", 1,
                   "--repeats", 1, "--quiet", "--json-out", report) == 2
    assert "--force" in one_error_line(capsys, "bench") and report.read_text() == "my notes"


def test_finetune_output_holding_another_finetune_is_refused_before_training(tmp_path):
    from dreampose.demo.tiny import tiny_dreampose
    from dreampose.settings import vae_settings
    from dreampose.training import finetune as ft

    base = tiny_dreampose()
    photo = torch.rand(1, 3, 64, 64)
    path = str(tmp_path / "alice_vae.safetensors")
    first = ft.finetune_to_file("vae", base, photo, None, vae_settings(steps=1, height=64, width=64), path)
    before = _bytes(path)
    steps = []
    with pytest.raises(DreamPoseError, match="already holds another finetune; replacing it needs --force"):
        ft.finetune_to_file("vae", base, photo, None, vae_settings(steps=2, height=64, width=64), path,
                            callback=lambda *a: steps.append(a))
    assert steps == [] and _bytes(path) == before
    again = ft.finetune_to_file("vae", base, photo, None, vae_settings(steps=1, height=64, width=64), path)
    assert again.cached and again.cache_key == first.cache_key          # the same job is still reused
    replaced = ft.finetune_to_file("vae", base, photo, None, vae_settings(steps=2, height=64, width=64), path,
                                   overwrite=True)
    assert not replaced.cached and _bytes(path) != before


def test_animate_replaces_only_its_own_run_of_the_same_job(tmp_path, tiny_dreampose_file, tiny_clip_folder, inputs,
                                                          capsys):
    out = tmp_path / "out"
    args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, out)
    assert run_cli(*args) == 0
    first = _bytes(out / "frame_0000.png")
    assert run_cli(*args) == 0                                  # a rerun of the same job replaces its own files
    capsys.readouterr()
    assert run_cli(*args, "--seed", 5) == 2                     # another job does not, unasked
    err = one_error_line(capsys, "animate")
    assert "already holds" in err and "dreampose.mp4" in err and "--force" in err
    assert _bytes(out / "frame_0000.png") == first
    assert run_cli(*args, "--seed", 5, "--force") == 0
    assert _bytes(out / "frame_0000.png") != first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "frame_0000.png").write_bytes(b"my frame")   # a user's file of the same name
    assert run_cli(*animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, tmp_path / "mine")) == 2
    assert (tmp_path / "mine" / "frame_0000.png").read_bytes() == b"my frame"
    assert run_cli(*animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, inputs["poses"])) == 2
    assert "is the input --poses" in capsys.readouterr().err


@pytest.mark.parametrize("command, flag, name", [("animate", "--image", "frame_0000.png"),
                                                 ("animate", "--init-latents", "init_latents.safetensors"),
                                                 ("demo", "--image", "key_frame.png")])
def test_an_input_the_run_would_write_over_is_refused_even_with_force(command, flag, name, tmp_path,
                                                                      tiny_dreampose_file, tiny_clip_folder, inputs,
                                                                      no_weight_loading, capsys):
    """--force replaces another run's files, never the run's own input (found by the fault sweep: the key
    frame or x_T kept in the output folder was overwritten by the run that read it)."""
    out = tmp_path / "out"
    out.mkdir()
    source = inputs["image"] if flag == "--image" else None
    if source:
        (out / name).write_bytes(_bytes(source))
    else:
        atomic_save_safetensors({"latents": torch.zeros(1, 4, H // 8, W // 8)}, str(out / name), {})
    before = _bytes(out / name)
    if command == "animate":
        args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, out, "--save-latents", "--force")
        if flag == "--image":
            args[args.index("--image") + 1] = str(out / name)
        else:
            args += [flag, str(out / name)]
    else:
        args = ["demo", "--out", out, "--image", out / name, "--force", "--frames", 2, "--quiet"]
    assert run_cli(*args) == 2
    assert f"{flag} {out / name} is one of the files this run writes into --out {out}" in one_error_line(
        capsys, command)
    assert _bytes(out / name) == before


# ------------------------------------------------------------------------------ limits before heavy work

@pytest.mark.parametrize("size", [(100032, 64), (64, 100032), (100032, 100032)])
def test_huge_sizes_are_refused_before_loading(size, tmp_path, tiny_dreampose_file, tiny_clip_folder, inputs,
                                               no_weight_loading, capsys):
    args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, tmp_path / "out")
    args[args.index("--width") + 1], args[args.index("--height") + 1] = size
    assert run_cli(*args) == 2
    assert "larger than 4096×4096" in one_error_line(capsys, "animate")
    assert run_cli("synth", "--out", tmp_path / "world", "--width", 100000, "--height", 100000) == 2
    assert "must be from 32 to 4096 pixels" in one_error_line(capsys, "synth")


def test_seeds_are_unsigned_64_bit(capsys, tmp_path):
    parser = cli.build_parser()
    base = ["animate", "--image", "x", "--poses", "y", "--out", "z"]
    assert parser.parse_args([*base, "--seed", str(MAX_SEED)]).seed == MAX_SEED
    torch.Generator().manual_seed(MAX_SEED)                      # the largest accepted seed really works
    for bad in (str(MAX_SEED + 1), "-1"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*base, "--seed", bad])
        assert exc.value.code == 2
        assert "--seed" in capsys.readouterr().err
    with pytest.raises(DreamPoseError, match="seed must be a whole number from 0 to 2\\*\\*64-1"):
        SamplingOptions(seed=2 ** 64).check()
    from dreampose.settings import FinetuneSettings, check_settings
    with pytest.raises(DreamPoseError, match="seed must be a whole number"):
        check_settings(FinetuneSettings(seed=-3))


def test_unique_names_do_not_collide(tmp_path):
    """Two writers of the same final name in one set: the last one wins, the first's temp file is gone."""
    name = str(tmp_path / f"{uuid.uuid4().hex}.txt")
    with output_set():
        write_text_atomic(name, "first")
        write_text_atomic(name, "second")
    assert open(name).read() == "second" and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ inputs that were accepted silently

@pytest.mark.parametrize("array, message", [
    (np.full((2, 8, 8), "a"), "UV must be real numbers, got dtype <U1"),
    (np.full((2, 8, 8), 0.5 + 0.5j), "UV must be real numbers, got dtype complex128"),
    (np.full((2, 8, 8), 200, np.uint8), "it looks like 0..255 picture values: divide by 255"),
    (np.full((2, 8, 8), np.nan, np.float32), "128 of 128 UV values are NaN or infinite"),
    (np.full((2, 8, 8), -0.5, np.float32), "UV values must lie in 0..1, found -0.5"),
])
def test_pose_files_with_impossible_values_are_refused(array, message, tmp_path):
    from dreampose.pipeline.poses import load_uv_file

    path = tmp_path / "frame_0_densepose.npy"
    np.save(path, array, allow_pickle=False)
    with pytest.raises(DreamPoseError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_uv_file(str(path))
    good = np.linspace(0, 1, 128, dtype=np.float64).reshape(2, 8, 8)
    np.save(path, good, allow_pickle=False)
    assert torch.equal(load_uv_file(str(path)), torch.from_numpy(good.astype(np.float32)))


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b""), "an empty or cut-off .npy file"),
    (lambda p: p.write_bytes(_bytes_of_npy(np.zeros((2, 8, 8), np.float32))[:100]), "not a plain numeric .npy array"),
    (lambda p: p.write_bytes(_bytes_of_npy(np.zeros((2, 8, 8), np.float32))[:300]), "not a plain numeric .npy array"),
    (lambda p: np.save(p, np.zeros((2, 0, 0), np.float32)), "expected a (2, H, W) UV array with H, W > 0"),
    (lambda p: np.save(p, np.zeros((2, 8, 0), np.float32)), "expected a (2, H, W) UV array with H, W > 0"),
])
def test_empty_or_cut_off_pose_files_are_refused(write, message, tmp_path):
    from dreampose.pipeline.poses import load_uv_folder

    write(tmp_path / "frame_0_densepose.npy")
    with pytest.raises(DreamPoseError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_uv_folder(str(tmp_path))


def _bytes_of_npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_file_flags_pointing_at_a_folder_say_so(tmp_path, tiny_dreampose_file, tiny_clip_folder, inputs,
                                                no_weight_loading, capsys):
    args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, tmp_path / "o", "--init-latents", tmp_path)
    assert run_cli(*args) == 2
    assert f"--init-latents {tmp_path} is a folder; give the .safetensors file" in one_error_line(capsys, "animate")
    args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, tmp_path / "o", "--subject", tmp_path)
    assert run_cli(*args) == 2
    assert f"'{tmp_path}' is a folder; give the file itself" in one_error_line(capsys, "animate")


@pytest.mark.parametrize("fps", ["1e-9", "1e300", "0"])
def test_frame_rates_no_video_writer_takes_are_refused_at_once(fps, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("animate", "--image", "x.png", "--poses", "p", "--out", tmp_path, "--fps", fps)
    assert exc.value.code == 2 and "must be from 0.1 to 1000 frames per second" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [("missing.safetensors", "--dreampose: not found: "),
                                           ("notes.txt", "not a weights file; give our DreamPose .safetensors")])
def test_a_dreampose_flag_that_names_no_weights_says_so_not_that_clip_is_missing(name, message, tmp_path, inputs,
                                                                                 no_weight_loading, capsys):
    """Without --clip, a typo in --dreampose used to say "--clip is required" (the bundle's CLIP was looked for)."""
    (tmp_path / "notes.txt").write_text("not weights")
    assert run_cli("animate", "--dreampose", tmp_path / name, "--image", inputs["image"], "--poses", inputs["poses"],
                   "--out", tmp_path / "o", "--threads", 1) == 2
    err = one_error_line(capsys, "animate")
    assert message in err and "--clip" not in err


def test_synth_under_a_file_says_so_before_any_work(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert run_cli("synth", "--out", tmp_path / "notes.txt" / "sub", "--videos", 1, "--frames", 2, "--height", 64,
                   "--width", 64, "--quiet") == 2
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in one_error_line(capsys, "synth")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a /proc file system")
def test_a_folder_that_takes_no_file_is_refused_before_any_work(tmp_path, tiny_dreampose_file, tiny_clip_folder,
                                                                inputs, no_weight_loading, capsys):
    """/proc passes the permission checks for root, yet no file can be made there: a real probe says so."""
    assert run_cli(*animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, "/proc/dreampose_out")) == 2
    assert "no file can be created in /proc" in one_error_line(capsys, "animate")
    assert not leftovers(tmp_path)


def test_threads_beyond_any_machine_are_refused(tmp_path, tiny_dreampose_file, tiny_clip_folder, inputs,
                                                no_weight_loading, capsys):
    args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, tmp_path / "o")
    args[args.index("--threads") + 1] = 100000            # made OpenMP crash the process (signal 11)
    assert run_cli(*args) == 2
    assert "--threads 100000: at most 1024" in one_error_line(capsys, "animate")


def test_an_allocation_failure_is_one_line_not_a_traceback(monkeypatch, capsys):
    """PyTorch reports a failed allocation as a RuntimeError (CPU) or OutOfMemoryError (CUDA): one line, exit 1.
    Any other RuntimeError is a bug and keeps its traceback."""
    import dreampose.cli.synth as synth

    def alloc(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 2560000000 bytes.")

    monkeypatch.setattr(synth, "run", alloc)
    assert run_cli("synth", "--out", "unused") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreampose synth: error: out of memory; try a smaller size") and "Traceback" not in err
    monkeypatch.setattr(synth, "run", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli("synth", "--out", "unused")


def test_the_demo_takes_any_subject_of_the_world_and_a_bounded_clip(tmp_path, capsys):
    """``demo --subject N`` (a number, not a subject file) used to crash the output check for every N > 0."""
    assert run_cli("demo", "--out", tmp_path / "d", "--subject", 3, "--frames", 2, "--steps", 1, "--width", 64,
                   "--height", 64, "--finetune-steps", 0, "--vae-finetune-steps", 0, "--quiet", "--threads", 1) == 0
    assert (tmp_path / "d" / "frame_0001.png").is_file()
    for flag, value in (("--subject", 2 ** 32), ("--frames", 10 ** 9)):
        with pytest.raises(SystemExit) as exc:
            run_cli("demo", "--out", tmp_path / "e", flag, value)
        assert exc.value.code == 2 and "must be at most" in capsys.readouterr().err


def test_an_image_flag_pointing_at_a_folder_says_so(tmp_path, tiny_dreampose_file, tiny_clip_folder, inputs,
                                                    no_weight_loading, capsys):
    args = animate_args(tiny_dreampose_file, tiny_clip_folder, {**inputs, "image": str(tmp_path)}, tmp_path / "o")
    assert run_cli(*args) == 2
    assert f"--image {tmp_path} is a folder; give an image file" in one_error_line(capsys, "animate")


@pytest.mark.parametrize("change, message", [
    ({"--s-image": 1000}, "s_image must be a number from 0 to 30"),
    ({"--s-pose": -2}, "s_pose must be a number from 0 to 30"),
    ({"--guidance-start": 0.7, "--guidance-end": 0.2}, "guidance_start (0.7) is after guidance_end (0.2)"),
    ({"--init-latents": "NAN"}, "the latents must be finite floating-point numbers"),
])
def test_absurd_guidance_and_nan_latents_are_refused_before_loading(change, message, tmp_path, tiny_dreampose_file,
                                                                    tiny_clip_folder, inputs, no_weight_loading,
                                                                    capsys):
    from safetensors.torch import save_file

    args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, tmp_path / "out")
    for flag, value in change.items():
        if value == "NAN":
            value = str(tmp_path / "x_t.safetensors")
            save_file({"latents": torch.full((1, 4, H // 8, W // 8), float("nan"))}, value)
        args += [flag, value]
    assert run_cli(*args) == 2
    assert message in one_error_line(capsys, "animate")


def test_learning_rates_above_one_are_refused():
    from dreampose.settings import FinetuneSettings, check_settings

    with pytest.raises(DreamPoseError, match="lr must be a positive number no larger than 1"):
        check_settings(FinetuneSettings(lr=10.0))
    assert check_settings(FinetuneSettings(lr=1.0)).lr == 1.0


def test_an_empty_weights_file_says_it_is_empty(tmp_path, tiny_clip_folder, inputs, capsys):
    empty = tmp_path / "unet_epoch_20.pth"
    empty.write_bytes(b"")
    assert run_cli(*animate_args(str(empty), tiny_clip_folder, inputs, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the file is empty (0 bytes), so the download or copy did not finish" in err and "no VAE" not in err


def test_the_authors_release_folder_means_its_newest_epoch(tmp_path, authors_release, tiny_clip_folder, inputs,
                                                           no_weight_loading, capsys):
    import shutil

    from dreampose.loaders.load import newest_authors_unet

    folder = tmp_path / "release"
    folder.mkdir()
    for epoch in (3, 10):                  # 10 is newer, though "10" sorts before "3" as text
        shutil.copy(authors_release.unet_path, folder / f"unet_epoch_{epoch}.pth")
        shutil.copy(authors_release.adapter_path, folder / f"adapter_{epoch}.pth")
    (folder / "unet_epoch_x.pth").write_bytes(b"")   # not an epoch file: ignored
    assert newest_authors_unet(str(folder)) == str(folder / "unet_epoch_10.pth")
    with pytest.raises(DreamPoseError, match="without the authors' unet_epoch_N.pth"):
        newest_authors_unet(str(tmp_path / "release" / ".."))
    args = animate_args(str(folder), tiny_clip_folder, inputs, tmp_path / "out", "--width", 100032)
    assert run_cli(*args) == 2          # stops at the size, after naming the file it took
    err = capsys.readouterr().err
    assert f"--dreampose: using {folder / 'unet_epoch_10.pth'} (the newest unet_epoch_N.pth" in err


def test_no_command_needs_clip_when_the_bundle_carries_it(tmp_path, inputs, no_weight_loading, capsys):
    from dreampose.demo.config import DEMO_FILE
    from dreampose.evaluation.evaluate import check_bundle

    args = [a for a in animate_args(DEMO_FILE, "-", inputs, tmp_path / "out", "--width", 100032)]
    del args[args.index("--clip"):args.index("--clip") + 2]
    assert run_cli(*args) == 2
    assert "larger than 4096" in one_error_line(capsys, "animate")    # past the weight checks: no --clip needed
    assert "clip_config" in check_bundle(DEMO_FILE, clip=None)        # eval's check
    with pytest.raises(DreamPoseError, match="--clip is required"):
        check_bundle(inputs["image"], clip=None)


# ------------------------------------------------------------------------ conditions and subjects know their model

def test_a_condition_is_refused_by_another_model_before_any_unet_call():
    from dreampose.demo.tiny import tiny_dreampose
    from dreampose.pipeline.conditioning import encode_image_condition
    from dreampose.pipeline.poses import make_pose_windows
    from dreampose.pipeline.sampling import SampleStats, sample

    a, b = tiny_dreampose(seed=0), tiny_dreampose(seed=1)     # the same architecture, other weights
    cond = encode_image_condition(a, torch.rand(3, 64, 64), generator=torch.Generator().manual_seed(0))
    poses = make_pose_windows(torch.rand(2, 2, 32, 32), 64, 64)
    options = SamplingOptions(width=64, height=64, steps=2, sampler="ddim")
    stats = SampleStats()
    with pytest.raises(DreamPoseError, match="encoded by another DreamPose model"):
        sample(b, cond, poses, options, stats=stats)
    assert stats.unet_calls == 0
    half = a.shallow_copy(adapter=copy.deepcopy(a.adapter).to(torch.bfloat16))
    assert sample(half, cond, poses, options).shape == (2, 4, 8, 8)   # the same weights in another dtype: fine
    a.vae.decoder.conv_out.weight.data.mul_(2)                      # a decoder finetune changes nothing it used
    assert sample(a, cond, poses, options).shape == (2, 4, 8, 8)


def test_a_full_finetune_is_refused_on_another_base(tmp_path):
    from dreampose.demo.tiny import tiny_dreampose
    from dreampose.loaders.subject_file import apply_subject
    from dreampose.settings import FinetuneSettings, vae_settings
    from dreampose.training import finetune as ft

    base, other = tiny_dreampose(seed=0), tiny_dreampose(seed=1)
    photo, uv = torch.rand(1, 3, 64, 64), torch.rand(1, 2, 64, 64)
    subject = ft.finetune_to_file("subject", base, photo, uv, FinetuneSettings(steps=1, height=64, width=64),
                                  str(tmp_path / "alice.safetensors"))
    decoder = ft.finetune_to_file("vae", base, photo, None, vae_settings(steps=1, height=64, width=64),
                                  str(tmp_path / "alice_vae.safetensors"))
    for result, what in ((subject, "DreamPose UNet"), (decoder, "VAE")):
        with pytest.raises(DreamPoseError, match=f"trained on another {what}"):
            apply_subject(other, result.path)
        apply_subject(base, result.path)                              # on its own base: fine
        assert apply_subject(other, result.path, check_base=False) is not None
    both = apply_subject(apply_subject(base, subject.path), decoder.path)   # the two files of one subject
    assert both.info["vae_subject"] == decoder.path


def test_eval_keeps_another_runs_reports_unless_forced(tmp_path, no_weight_loading, capsys):
    from dreampose.demo.config import DEMO_FILE

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"command": "eval", "options": {"steps": 1}}))
    assert run_cli("eval", "--data", tmp_path, "--dreampose", DEMO_FILE, "--out", out) == 2
    err = one_error_line(capsys, "eval")
    assert "already holds metrics.json" in err and "--force" in err
    assert run_cli("eval", "--data", out, "--dreampose", DEMO_FILE, "--out", out, "--force") == 2
    assert "is the input --data" in one_error_line(capsys, "eval")


# ------------------------------------------------------------------------------ many runs in one process

def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")
def test_a_long_batch_in_one_process_keeps_nothing_per_run(tmp_path, tiny_dreampose_file, tiny_clip_folder, inputs):
    """14 animate runs of varied sizes and frame counts through the command line's main() in one
    process: what is resident after the last is what was resident after the second. Measured with the
    same loop on this box: +0.9 MiB over the 12 runs between (single runs blip by +10 MiB: malloc's
    arenas); a model kept per run (the tiny bundle is a 4.7 MB file) would add ~56 MiB, over the bound."""
    import gc

    sizes = [(64, 64), (128, 192), (64, 128)]
    resident = []
    for run in range(14):
        w, h = sizes[run % 3]
        args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, tmp_path / f"run{run}",
                            "--max-frames", 1 + run % 2)
        args[args.index("--width") + 1], args[args.index("--height") + 1] = w, h
        assert run_cli(*args) == 0
        gc.collect()
        resident.append(_rss_mib())
    assert resident[-1] - resident[1] < 24, resident


def test_synth_keeps_its_own_videos_and_refuses_another_runs(tmp_path, capsys):
    out = tmp_path / "world"
    base = ["synth", "--out", out, "--videos", 1, "--frames", 2, "--height", 64, "--width", 64, "--quiet"]
    assert run_cli(*base) == 0
    frame = out / "train" / "world_0000" / "frame_0.png"
    first = _bytes(frame)
    assert run_cli(*base) == 0 and "1 already finished" in capsys.readouterr().out   # the same job: resumed
    assert run_cli(*base, "--seed", 3) == 2
    assert "holds a video of another synth run" in one_error_line(capsys, "synth") and _bytes(frame) == first
    assert run_cli(*base, "--seed", 3, "--force") == 0 and _bytes(frame) != first


@pytest.mark.parametrize("argv", [
    ["animate", "--image", "{tmp}/none.png", "--poses", "{tmp}", "--dreampose", "{tmp}/none.safetensors",
     "--clip", "{tmp}", "--out", "{tmp}/out"],
    ["animate", "--image", "{tmp}/none.png", "--poses", "{tmp}", "--dreampose", "{demo}", "--out", "{tmp}/out"],
    ["finetune-vae", "--dreampose", "{demo}", "--images", "{tmp}/none", "--out", "{tmp}/v.safetensors"],
    ["eval", "--data", "{tmp}", "--dreampose", "{tmp}/none.safetensors", "--clip", "{tmp}/none", "--out",
     "{tmp}/ev"],
    ["train", "--data", "{tmp}", "--base", "{tmp}/none", "--clip", "{tmp}/none", "--out", "{tmp}/run"],
])
def test_a_wrong_path_is_answered_before_the_sampling_stack_is_imported(argv, tmp_path):
    """The path checks run before diffusers/transformers are imported, so a typo costs about PyTorch's
    import time, not the whole stack's."""
    from dreampose.demo.config import DEMO_FILE

    args = [a.format(tmp=tmp_path, demo=DEMO_FILE) for a in argv]
    probe = ("import sys\nfrom dreampose.cli import main as cli\nrc = cli.main(sys.argv[1:])\n"
             "print('rc', rc, 'heavy', sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": root}, cwd=root)
    assert "not found" in done.stderr, done.stderr
    assert done.stdout.strip() == "rc 2 heavy []", (done.stdout, done.stderr)
