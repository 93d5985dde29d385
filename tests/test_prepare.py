"""`python -m dreampose prepare` (dreampose/data/prepare.py, dreampose/cli/prepare.py).

Videos are small MP4s written with ``dreampose.pipeline.video.write_mp4`` from synthetic frames (a coloured
rectangle moving right, and an 8×8 top-left block whose blue value changes per frame). The
estimator is the tiny TorchScript export of tests/test_densepose.py: it moves its box right by the
blue value at pixel (0,0), so every frame gets its own UV and a mix-up of frames or colour order
shows. MP4 is lossy, so the expected UV is computed by ``estimate_uv`` on the frames as OpenCV
decodes them, and compared for equality.
"""
from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from test_densepose import BOX_A, FakeExport, person_a, save_script, stack

from dreampose.cli import main as cli
from dreampose.data import densepose, prepare
from dreampose.data.dataset import (
    MARKER,
    find_videos,
    load_frame,
    load_pose,
    read_video_folder,
)
from dreampose.errors import DreamPoseError
from dreampose.pipeline.video import write_mp4

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

H, W, N = 48, 64, 6
FAST = {"detect_resolution": 0, "frames_per_batch": 2}   # the fake export needs no 800-pixel detection input


def synthetic_frames(n: int = N, seed: int = 0) -> np.ndarray:
    """``[n,H,W,3]`` uint8 RGB: a rectangle moving 4 px a frame, top-left block blue = 8·k (+ seed)."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    frames[...] = (30, 40, 50)
    for k in range(n):
        frames[k, 12:36, 6 + 4 * k:26 + 4 * k] = (200, 60 + 10 * seed, 20)
        frames[k, :8, :8] = (0, 0, 8 * k + seed)
    return frames


def write_video(path, n: int = N, fps: float = 30.0, seed: int = 0) -> str:
    return write_mp4(synthetic_frames(n, seed), str(path), fps=fps)


def decoded(path) -> np.ndarray:
    """Every frame as OpenCV decodes it, RGB."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return np.stack(frames)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_script(FakeExport(torch.tensor([BOX_A]), *stack(person_a())),
                       tmp_path_factory.mktemp("dp") / "fake.torchscript")


@pytest.fixture(scope="module")
def model(model_path):
    return densepose.load_densepose_model(model_path)


class GatedExport(torch.nn.Module):
    """Like the fake export, but detects nobody when the frame's pixel (0,0) is bright red."""

    def __init__(self):
        super().__init__()
        coarse, fine, u, v = stack(person_a())
        self.register_buffer("boxes", torch.tensor([BOX_A]))
        self.register_buffer("coarse", coarse)
        self.register_buffer("fine", fine)
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def forward(self, image: torch.Tensor):
        n = 0 if int(image[2, 0, 0]) > 128 else 1   # channel 2 of the BGR input: red
        return self.boxes[:n], self.coarse[:n], self.fine[:n], self.u[:n], self.v[:n]


def expected_uv(model, frames: np.ndarray) -> torch.Tensor:
    return densepose.estimate_uv(model, torch.from_numpy(np.ascontiguousarray(frames)), detect_resolution=0).uv


def folder_frames(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared folder's frames ``[F,H,W,3]`` uint8 and poses ``[F,2,H,W]``, read by the dataset reader."""
    video = read_video_folder(str(folder))
    return (torch.stack([load_frame(p) for p in video.frames]).permute(0, 2, 3, 1),
            torch.stack([load_pose(p) for p in video.poses]))


def tree(folder) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path → bytes)."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def info(folder) -> dict:
    with open(os.path.join(folder, MARKER)) as f:
        return json.load(f)


def run_cli(*args) -> int:
    return cli.main(["prepare", *[str(a) for a in args]])


# ---------------------------------------------------------------------------------------------- sources

def test_find_sources_ubc_plain_nested_and_frame_folders(tmp_path):
    root = tmp_path / "root"
    for rel in ("train/A.mp4", "test/B.MP4", "clip.webm", "deep/er/c.mov", ".hidden/x.mp4", "train/.tmp-1.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "shots" / "s1").mkdir(parents=True)
    (root / "shots" / "s1" / "frame_0.png").write_bytes(b"x")
    (root / "shots" / "s1" / "frame_0_iuv.png").write_bytes(b"x")
    (root / "train" / "cover.jpg").write_bytes(b"x")              # an image beside videos is not a frame folder
    (root / "out" / "old").mkdir(parents=True)
    (root / "out" / "old" / "frame_0.png").write_bytes(b"x")      # the output inside the root is not searched
    found = prepare.find_sources(str(root), exclude=(str(root / "out"),))
    assert [(s.kind, s.rel) for s in found] == [
        ("video", "clip"), ("video", os.path.join("deep", "er", "c")), ("frames", os.path.join("shots", "s1")),
        ("video", os.path.join("test", "B")), ("video", os.path.join("train", "A"))]
    assert all(os.path.isabs(s.path) for s in found)
    # a frame folder given as the root is prepared under its own name; one video file as itself
    assert [(s.kind, s.rel) for s in prepare.find_sources(str(root / "shots" / "s1"))] == [("frames", "s1")]
    assert [(s.kind, s.rel) for s in prepare.find_sources(str(root / "clip.webm"))] == [("video", "clip")]

    (root / "train" / "A.mov").write_bytes(b"x")
    with pytest.raises(DreamPoseError, match=r"would both be prepared into"):
        prepare.find_sources(str(root))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DreamPoseError, match="no videos"):
        prepare.find_sources(str(tmp_path / "empty"))
    with pytest.raises(DreamPoseError, match="not found"):
        prepare.find_sources(str(tmp_path / "missing"))


def test_frame_picks_and_output_size():
    picks = prepare.frame_picks(3)
    assert [next(picks) for _ in range(4)] == [0, 3, 6, 9]
    picks = prepare.frame_picks(2.5)      # 30 fps → 12 fps: nearest source frame to each 1/12 s
    assert [next(picks) for _ in range(5)] == [0, 3, 5, 8, 10]
    assert prepare.pick_step(prepare.PrepareOptions(fps=10), 30.0, "v") == (3.0, 10.0)
    assert prepare.pick_step(prepare.PrepareOptions(fps=60), 30.0, "v") == (1.0, 30.0)   # never upsampled
    assert prepare.pick_step(prepare.PrepareOptions(every=2), 30.0, "v") == (2.0, 15.0)
    with pytest.raises(DreamPoseError, match="frame rate is unknown"):
        prepare.pick_step(prepare.PrepareOptions(fps=10), None, "v")
    assert prepare.output_size(940, 720, 640, 512) == (640, 512)
    assert prepare.output_size(48, 64, 24, None) == (24, 32)
    assert prepare.output_size(48, 64, None, 100) == (75, 100)
    assert prepare.output_size(48, 64, None, None) == (48, 64)
    with pytest.raises(DreamPoseError, match="not both"):
        prepare.PrepareOptions(fps=10, every=2).check()
    with pytest.raises(DreamPoseError, match="person"):
        prepare.PrepareOptions(person="tallest").check()


def test_uv_is_resized_nearest_never_blended():
    uv = torch.zeros(2, 4, 4)
    uv[0, :, 2:] = 0.8                   # a part border between columns 1 and 2
    uv[1] = torch.arange(16.0).reshape(4, 4) / 16
    small = prepare.resize_uv(uv, 2, 2)
    # nearest at pixel centres: output pixel i samples input floor((i + 0.5)·2) = 1, 3
    assert torch.equal(small, uv[:, 1::2, 1::2])
    big = prepare.resize_uv(uv, 8, 8)
    assert torch.equal(big[0].unique(), uv[0].unique())   # only the two parts' values, nothing between
    assert torch.equal(big, uv.repeat_interleave(2, 1).repeat_interleave(2, 2))


# ---------------------------------------------------------------------------------------------- videos

def test_ubc_layout_through_the_cli(tmp_path, model, model_path, capsys):
    root, out = tmp_path / "ubc", tmp_path / "out"
    videos = {os.path.join("train", "A"): write_video(root / "train" / "A.mp4", seed=0),
              os.path.join("test", "B"): write_video(root / "test" / "B.mp4", n=4, seed=3)}
    assert run_cli(root, "--out", out, "--densepose", model_path, "--detect-resolution", 0, "--device", "cpu") == 0
    captured = capsys.readouterr()
    assert "2 prepared, 0 skipped (already prepared), 0 failed; 10 frame(s) written" in captured.out
    assert f"[1/2] {os.path.join('test', 'B')}" in captured.err and "done: 4 frames" in captured.err

    found = find_videos(str(out))
    assert [os.path.relpath(v.path, out) for v in found] == [os.path.join("test", "B"), os.path.join("train", "A")]
    for rel, video in videos.items():
        source = decoded(video)
        frames, poses = folder_frames(out / rel)
        assert frames.shape == (len(source), H, W, 3) and poses.shape == (len(source), 2, H, W)
        assert torch.equal(frames, torch.from_numpy(source))            # RGB as decoded, lossless PNG
        assert torch.equal(poses, expected_uv(model, source))           # the estimator on the same frames
        marker = info(out / rel)
        assert marker["frames"] == len(source) and (marker["height"], marker["width"]) == (H, W)
        assert marker["fps"] == 30.0 and marker["source_frames"] == list(range(len(source)))
        assert marker["uv_source"] == f"densepose {model_path}" and marker["empty_frames"] == []
        assert marker["source"] == os.path.abspath(video) and marker["kind"] == "video"
    # the box follows the blue block, so the frames' poses differ (a frame mix-up would show)
    assert not torch.equal(poses[0], poses[-1])

    before = tree(out)
    assert run_cli(root, "--out", out, "--densepose", model_path, "--detect-resolution", 0) == 0
    again = capsys.readouterr()
    assert "0 prepared, 2 skipped (already prepared), 0 failed; 0 frame(s) written" in again.out
    assert "skipped: already prepared" in again.err
    assert tree(out) == before


def test_plain_folder_resize_and_every(tmp_path, model):
    root, out = tmp_path / "clips", tmp_path / "out"
    a = write_video(root / "a.mp4")
    b = write_video(root / "sub" / "b.mov", n=5, seed=1)   # mp4v in a .mov name: OpenCV reads it by content
    events = []
    summary = prepare.prepare_dataset(str(root), str(out), densepose=model,
                                      options=prepare.PrepareOptions(height=24, width=32, every=2, **FAST),
                                      progress=events.append)
    assert summary.prepared == ["a", os.path.join("sub", "b")] and not summary.failed and not summary.skipped
    assert summary.frames_written == 3 + 3
    for rel, video, picked in (("a", a, [0, 2, 4]), (os.path.join("sub", "b"), b, [0, 2, 4])):
        source = decoded(video)[picked]
        want = np.stack([prepare.resize_frame(f, 24, 32) for f in source])
        frames, poses = folder_frames(out / rel)
        assert frames.shape == (3, 24, 32, 3) and poses.shape == (3, 2, 24, 32)
        assert torch.equal(frames, torch.from_numpy(want))
        assert torch.equal(poses, expected_uv(model, want))   # DensePose ran on the frame as written
        assert poses[0].any() and poses[1].any()              # a person in the first frames (not zeros = zeros)
        marker = info(out / rel)
        assert marker["source_frames"] == picked and marker["fps"] == 15.0
        assert (marker["height"], marker["width"], marker["source_height"], marker["source_width"]) == (24, 32, H, W)
    kinds = [(e.kind, e.index, e.count) for e in events if e.kind in ("start", "done")]
    assert kinds == [("start", 1, 2), ("done", 1, 2), ("start", 2, 2), ("done", 2, 2)]
    frame_events = [(e.done, e.total) for e in events if e.kind == "frames" and e.video == "a"]
    assert frame_events[0] == (2, 3) and frame_events[-1] == (3, 3)


def test_fps_max_frames_and_one_side_resize(tmp_path, model):
    video = write_video(tmp_path / "v" / "v.mp4", n=8)
    out = tmp_path / "out"
    prepare.prepare_dataset(str(tmp_path / "v"), str(out), densepose=model,
                            options=prepare.PrepareOptions(fps=10, height=24, **FAST))
    marker = info(out / "v")
    assert marker["source_frames"] == [0, 3, 6] and marker["fps"] == 10.0 and marker["source_fps"] == 30.0
    assert (marker["height"], marker["width"]) == (24, 32)
    source = decoded(video)[[0, 3, 6]]
    assert torch.equal(folder_frames(out / "v")[0],
                       torch.from_numpy(np.stack([prepare.resize_frame(f, 24, 32) for f in source])))

    prepare.prepare_dataset(str(tmp_path / "v"), str(tmp_path / "out2"), densepose=model,
                            options=prepare.PrepareOptions(every=3, max_frames=2, **FAST))
    marker = info(tmp_path / "out2" / "v")
    assert marker["source_frames"] == [0, 3] and marker["frames"] == 2
    frames, poses = folder_frames(tmp_path / "out2" / "v")
    assert torch.equal(frames, torch.from_numpy(decoded(video)[[0, 3]]))
    assert torch.equal(poses, expected_uv(model, decoded(video)[[0, 3]]))


def test_corrupt_video_is_reported_and_skipped(tmp_path, model, model_path, capsys):
    root, out = tmp_path / "root", tmp_path / "out"
    write_video(root / "good.mp4")
    (root / "bad.mp4").write_bytes(b"not a video at all" * 50)
    assert run_cli(root, "--out", out, "--densepose", model_path, "--detect-resolution", 0) == 1
    captured = capsys.readouterr()
    assert "1 prepared, 0 skipped (already prepared), 1 failed; 6 frame(s) written" in captured.out
    assert "[1/2] bad: FAILED:" in captured.err and "cannot be decoded" in captured.err
    assert "failed: bad:" in captured.err
    assert not (out / "bad").exists()
    assert [v.name for v in find_videos(str(out))] == ["good"]


def test_clear_errors_before_any_work(tmp_path, model_path, capsys):
    root, out = tmp_path / "root", tmp_path / "out"
    write_video(root / "train" / "A.mp4")
    assert run_cli(root, "--out", out) == 2       # no --densepose: say which video needs it
    err = capsys.readouterr().err
    assert "needs DensePose UV estimated" in err and os.path.join("train", "A.mp4") in err and "--densepose" in err
    assert not out.exists()
    assert run_cli(root, "--out", out, "--densepose", tmp_path / "missing.torchscript") == 2
    assert "DensePose model not found" in capsys.readouterr().err and not out.exists()
    (tmp_path / "empty").mkdir()
    assert run_cli(tmp_path / "empty", "--out", out, "--densepose", model_path) == 2
    assert "no videos" in capsys.readouterr().err
    assert run_cli(root, "--out", root, "--densepose", model_path) == 2
    assert "is the source folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(root, "--out", out, "--every", 2, "--fps", 10)
    # the command line offers the estimator's own choices and defaults (one definition: dreampose.settings)
    args = cli.build_parser().parse_args(["prepare", str(root), "--out", str(out)])
    assert (args.person, args.detect_resolution) == (densepose.PERSON_CHOICES[0], densepose.DETECT_SHORT_SIDE)
    with pytest.raises(SystemExit):
        run_cli(root, "--out", out, "--person", "tallest")


# ---------------------------------------------------------------------------------------------- frame folders

def write_frame_folder(folder, frames: np.ndarray, uv: dict[int, np.ndarray]) -> None:
    """The authors' layout: frame_N.png and (for the numbers in ``uv``) frame_N_densepose.npy, numbered from 1."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"frame_{k + 1}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        if k + 1 in uv:
            np.save(folder / f"frame_{k + 1}_densepose.npy", uv[k + 1])


def authors_uv(k: int) -> np.ndarray:
    """float64 like the authors' files; a part border at column 32 and values that differ per frame."""
    uv = np.zeros((2, H, W))
    uv[0, 8:40, 16:32] = 0.25 + k / 100
    uv[0, 8:40, 32:48] = 0.75
    uv[1, 8:40, 16:48] = np.linspace(0.1, 0.9, 32)[None, :] + k / 1000
    return uv


def test_existing_npy_used_without_an_estimator(tmp_path):
    frames = synthetic_frames(4)
    write_frame_folder(tmp_path / "src" / "clip1", frames, {k: authors_uv(k) for k in range(1, 5)})
    out = tmp_path / "out"
    summary = prepare.prepare_dataset(str(tmp_path / "src"), str(out), densepose=None,
                                      options=prepare.PrepareOptions(height=24, width=32))
    assert summary.prepared == ["clip1"]
    got_frames, got_uv = folder_frames(out / "clip1")
    assert torch.equal(got_frames, torch.from_numpy(np.stack([prepare.resize_frame(f, 24, 32) for f in frames])))
    for k in range(4):   # nearest at pixel centres: every other pixel from the second one, never a blend
        assert torch.equal(got_uv[k], torch.from_numpy(authors_uv(k + 1)[:, 1::2, 1::2]).float())
    marker = info(out / "clip1")
    assert marker["uv_source"] == "existing npy" and marker["kind"] == "frames" and marker["fps"] is None
    assert marker["settings"]["densepose"] is None and marker["source_frames"] == [0, 1, 2, 3]


def test_frames_without_npy_need_the_estimator(tmp_path, model, model_path):
    frames = synthetic_frames(3)
    write_frame_folder(tmp_path / "src" / "clip", frames, {1: authors_uv(1), 3: authors_uv(3)})
    out = tmp_path / "out"
    with pytest.raises(DreamPoseError, match=r"clip .*frames that have no _densepose.npy.*needs DensePose"):
        prepare.prepare_dataset(str(tmp_path / "src"), str(out))
    assert not out.exists()
    prepare.prepare_dataset(str(tmp_path / "src"), str(out), densepose=model_path,
                            options=prepare.PrepareOptions(**FAST))
    _, uv = folder_frames(out / "clip")
    assert torch.equal(uv[0], torch.from_numpy(authors_uv(1)).float())
    assert torch.equal(uv[1], expected_uv(model, frames[1:2])[0])     # PNG is lossless: the original frame
    assert torch.equal(uv[2], torch.from_numpy(authors_uv(3)).float())
    assert info(out / "clip")["uv_source"] == f"existing npy (2 frames) + densepose {model_path} (1 frames)"


def test_empty_frames_are_counted_and_warned(tmp_path):
    frames = synthetic_frames(5)
    frames[[1, 2], 0, 0] = (255, 0, 0)         # bright red corner: the gated export sees nobody
    write_frame_folder(tmp_path / "src" / "clip", frames, {})
    gated = densepose.load_densepose_model(save_script(GatedExport(), tmp_path / "gated.torchscript"))
    events = []
    prepare.prepare_dataset(str(tmp_path / "src"), str(tmp_path / "out"), densepose=gated,
                            options=prepare.PrepareOptions(**FAST), progress=events.append)
    assert info(tmp_path / "out" / "clip")["empty_frames"] == [1, 2]
    _, uv = folder_frames(tmp_path / "out" / "clip")
    assert not uv[1].any() and not uv[2].any() and uv[0].any() and uv[3].any()
    warnings = [e.message for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "2 of 5 frames have no person detected" in warnings[0]


# ---------------------------------------------------------------------------------------------- resuming

class Interrupt(BaseException):
    """Stands for Ctrl-C or a killed process: not an error one video's failure report would catch."""


def counting_estimator(monkeypatch) -> list[int]:
    calls = []
    real = prepare.estimate_uv

    def count(model, images, **kw):
        calls.append(len(images))
        return real(model, images, **kw)

    monkeypatch.setattr(prepare, "estimate_uv", count)
    return calls


def test_interrupted_run_resumes_to_the_same_files(tmp_path, model, monkeypatch):
    root = tmp_path / "root"
    write_video(root / "v.mp4")
    write_video(root / "w.mp4", n=4, seed=2)
    options = prepare.PrepareOptions(**FAST)
    prepare.prepare_dataset(str(root), str(tmp_path / "full"), densepose=model, options=options)

    def stop_after_two_frames(event):
        if event.kind == "frames" and event.video == "v" and event.done >= 2:
            raise Interrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        prepare.prepare_dataset(str(root), str(out), densepose=model, options=options, progress=stop_after_two_frames)
    assert sorted(os.listdir(out / "v")) == ["frame_0.png", "frame_0_densepose.npy", "frame_1.png",
                                             "frame_1_densepose.npy", prepare.PLAN]
    assert not (out / "w").exists()
    calls = counting_estimator(monkeypatch)
    summary = prepare.prepare_dataset(str(root), str(out), densepose=model, options=options)
    assert summary.prepared == ["v", "w"] and summary.frames_written == 4 + 4
    assert sum(calls) == 4 + 4              # the two finished frames were not estimated again
    assert tree(out) == tree(tmp_path / "full")


def test_interrupted_folder_with_gaps_resumes_to_the_same_files(tmp_path, model, monkeypatch):
    root = tmp_path / "root"
    write_video(root / "v.mp4")
    options = prepare.PrepareOptions(**FAST)
    prepare.prepare_dataset(str(root), str(tmp_path / "full"), densepose=model, options=options)

    def stop(event):
        if event.kind == "frames" and event.done >= 2:
            raise Interrupt

    with pytest.raises(Interrupt):          # frames 0 and 1 done, and the folder's job recorded (prepare.PLAN)
        prepare.prepare_dataset(str(root), str(tmp_path / "out"), densepose=model, options=options, progress=stop)
    partial = tmp_path / "out" / "v"
    for name in ("frame_4.png", "frame_4_densepose.npy"):  # done frames, with a gap
        shutil.copy(tmp_path / "full" / "v" / name, partial / name)
    (partial / "frame_2.png").write_bytes(b"half")          # a png without its npy is not done
    (partial / ".frame_3.png.999.tmp").write_bytes(b"x")    # a crashed run's temporary file
    (partial / "frame_9.png").write_bytes(b"x")             # beyond the video's frames: removed
    (partial / "frame_9_densepose.npy").write_bytes(b"x")
    calls = counting_estimator(monkeypatch)
    events = []
    summary = prepare.prepare_dataset(str(root), str(tmp_path / "out"), densepose=model, options=options,
                                      progress=events.append)
    assert summary.frames_written == 3 and sum(calls) == 3   # frames 2, 3, 5
    assert any(e.kind == "warning" and "beyond its 6 frames" in e.message for e in events)
    assert tree(tmp_path / "out") == tree(tmp_path / "full")


def test_resume_with_other_settings_is_refused_then_overwritten(tmp_path, model):
    root = tmp_path / "root"
    write_video(root / "v.mp4")

    def stop(event):
        if event.kind == "frames" and event.done >= 2:
            raise Interrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        prepare.prepare_dataset(str(root), str(out), densepose=model, options=prepare.PrepareOptions(**FAST),
                                progress=stop)
    other = prepare.PrepareOptions(every=2, **FAST)
    summary = prepare.prepare_dataset(str(root), str(out), densepose=model, options=other)
    assert [rel for rel, _ in summary.failed] == ["v"]
    assert "started with other settings (every 1 → 2)" in summary.failed[0][1]
    summary = prepare.prepare_dataset(str(root), str(out), densepose=model,
                                      options=prepare.PrepareOptions(every=2, overwrite=True, **FAST))
    assert summary.prepared == ["v"]
    prepare.prepare_dataset(str(root), str(tmp_path / "fresh"), densepose=model, options=other)
    assert tree(out) == tree(tmp_path / "fresh")
    # a finished video is skipped, with a note when the settings asked for now differ
    events = []
    summary = prepare.prepare_dataset(str(root), str(out), densepose=model, options=prepare.PrepareOptions(**FAST),
                                      progress=events.append)
    assert summary.skipped == ["v"]
    assert [e.message for e in events if e.kind == "skipped"] == [
        "prepared with other settings (every 2 → 1); use overwrite to redo it"]


# ---------------------------------------------------------------------------------------------- refused before work

def test_out_holding_files_prepare_did_not_write_is_refused(tmp_path, capsys):
    frames = synthetic_frames(3)
    write_frame_folder(tmp_path / "src" / "clip", frames, {k: authors_uv(k) for k in range(1, 4)})
    out = tmp_path / "out"
    theirs = out / "clip"
    write_frame_folder(theirs, synthetic_frames(6, seed=3), {k: authors_uv(9) for k in range(1, 7)})
    (theirs / "frame_0.png").write_bytes(b"someone's frame")      # numbered like prepare's own files
    before = tree(out)
    for options in (prepare.PrepareOptions(), prepare.PrepareOptions(overwrite=True)):
        with pytest.raises(DreamPoseError, match=r"clip already holds frame_0.png and \d+ more that prepare did not "
                                                 r"write for this job; pass --force"):
            prepare.prepare_dataset(str(tmp_path / "src"), str(out), options=options)
        assert tree(out) == before
    assert run_cli(tmp_path / "src", "--out", out) == 2
    assert "pass --force" in capsys.readouterr().err and tree(out) == before
    assert run_cli(tmp_path / "src", "--out", out, "--force", "--quiet") == 0
    prepare.prepare_dataset(str(tmp_path / "src"), str(tmp_path / "fresh"))
    fresh = tree(tmp_path / "fresh" / "clip")
    got = tree(theirs)
    assert {n: got[n] for n in fresh if n != MARKER} == {n: b for n, b in fresh.items() if n != MARKER}
    assert sorted(got) == sorted(fresh)        # the other source's frames beyond these 3 are gone too
    # a finished folder another tool marked is kept as it is; redoing it (overwrite) needs force too
    marked = tmp_path / "marked"
    (marked / "clip").mkdir(parents=True)
    (marked / "clip" / "frame_0.png").write_bytes(b"x")
    (marked / "clip" / MARKER).write_text(json.dumps({"source": "synthetic world", "frames": 1}))
    assert prepare.prepare_dataset(str(tmp_path / "src"), str(marked)).skipped == ["clip"]
    with pytest.raises(DreamPoseError, match="did not write for this job"):
        prepare.prepare_dataset(str(tmp_path / "src"), str(marked), options=prepare.PrepareOptions(overwrite=True))
    assert (marked / "clip" / "frame_0.png").read_bytes() == b"x"


def test_sizes_beyond_max_size_are_refused_before_any_work(tmp_path, capsys):
    from dreampose.settings import MAX_SIZE

    write_frame_folder(tmp_path / "src" / "clip", synthetic_frames(2), {1: authors_uv(1), 2: authors_uv(2)})
    out = tmp_path / "out"
    big = prepare.PrepareOptions(width=100000, height=100000)
    with pytest.raises(DreamPoseError, match=rf"height 100000 is larger than {MAX_SIZE} pixels"):
        prepare.prepare_dataset(str(tmp_path / "src"), str(out), options=big)
    assert run_cli(tmp_path / "src", "--out", out, "--height", 100000) == 2
    assert f"larger than {MAX_SIZE} pixels" in capsys.readouterr().err and not out.exists()
    # one side given: the other follows the aspect ratio (64:48), here beyond the limit; that video fails unwritten
    summary = prepare.prepare_dataset(str(tmp_path / "src"), str(out), options=prepare.PrepareOptions(height=MAX_SIZE))
    assert [rel for rel, _ in summary.failed] == ["clip"] and f"larger than {MAX_SIZE}" in summary.failed[0][1]
    assert not (out / "clip").exists()
