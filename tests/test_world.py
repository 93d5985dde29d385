"""The synthetic fashion-video world: exact UV, appearance tied to the charts, motions, dataset files, CLI."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from dreampose.data import world
from dreampose.cli.main import main
from dreampose.data.dataset import MARKER, find_videos, load_frame, load_pose
from dreampose.errors import DreamPoseError

H, W, F = 96, 64, 16


def _video(seed: int, kind: str | None = None, frames: int = F, height: int = H, width: int = W):
    outfit = world.random_outfit(seed)
    return outfit, world.render_video(outfit, world.random_motion(seed, frames, kind), height, width)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum()).item()


@pytest.fixture(scope="module")
def videos():
    """One clip per motion family (different subjects), shared read-only."""
    return {kind: _video(seed, kind) for seed, kind in enumerate(world.MOTIONS)}


def test_api_constants():
    assert len(world.PARTS) >= 10 and len(set(world.PARTS)) == len(world.PARTS)
    assert {"walk", "sway", "wave", "turn"} <= set(world.MOTIONS)
    assert all(0 <= c <= 1 for c in world.BACKGROUND)
    assert world.random_motion(0, 5).shape == (5, len(world.POSE_PARAMS))


def test_same_seed_same_video_and_seeds_differ():
    o1, v1 = _video(7, frames=4)
    o2, v2 = _video(7, frames=4)
    assert o1 == o2
    for a, b in ((v1.frames, v2.frames), (v1.uv, v2.uv), (v1.parts, v2.parts)):
        assert torch.equal(a, b)
    assert v1.frames.dtype == torch.float32 and v1.uv.dtype == torch.float32 and v1.parts.dtype == torch.int64
    assert tuple(v1.frames.shape) == (4, 3, H, W) and tuple(v1.uv.shape) == (4, 2, H, W)
    assert tuple(v1.parts.shape) == (4, H, W)
    outfits = [world.random_outfit(s) for s in range(12)]
    assert len({o.top for o in outfits}) == 12 and len({o.skin for o in outfits}) == 12
    assert len({o.pattern for o in outfits}) >= 3          # patterns vary, not only colours
    assert not np.array_equal(world.random_motion(1, 8, "walk"), world.random_motion(2, 8, "walk"))


def test_uv_zero_exactly_on_background_and_in_range(videos):
    for _, video in videos.values():
        body = video.parts > 0
        u, v = video.uv[:, 0], video.uv[:, 1]
        assert (u[~body] == 0).all() and (v[~body] == 0).all()
        assert (u[body] >= world.UV_MIN).all() and (v[body] >= world.UV_MIN).all()
        assert (u[body] <= 1).all() and (v[body] <= 1).all()
        assert torch.equal(world.body_mask(video.uv), body)
        assert video.parts.max() <= len(world.PARTS)


def test_silhouette_is_exactly_the_body(videos):
    """No anti-aliasing and every outfit colour ≥ 0.2 from the background in some channel: the picture's
    person and the UV's body are the same pixels, also after 8-bit PNG quantisation (error ≤ 0.5/255)."""
    for outfit, video in videos.values():
        assert torch.equal(world.silhouette(video.frames), world.body_mask(video.uv))
        png = torch.from_numpy(np.asarray(video.frames.numpy() * 255).round() / 255).float()
        assert torch.equal(world.silhouette(png), world.body_mask(video.uv))
        background = video.frames.permute(0, 2, 3, 1)[video.parts == 0]          # [N,3]
        assert torch.equal(background, torch.tensor(world.BACKGROUND).expand_as(background))
        for colour in (outfit.skin, outfit.top, outfit.accent, outfit.bottom, outfit.hair, outfit.shoes):
            assert max(abs(c - b) for c, b in zip(colour, world.BACKGROUND)) >= 0.2 - 1e-6


def test_silhouette_threshold_on_hand_made_pixels():
    frames = torch.tensor(world.BACKGROUND).view(3, 1, 1).repeat(2, 1, 2, 3)
    frames[0, 1, 0, 0] += 0.09       # just over the default threshold in one channel
    frames[0, 2, 1, 2] -= 0.07       # under it
    mask = world.silhouette(frames)
    assert mask.shape == (2, 2, 3)
    assert mask[0, 0, 0] and mask.sum() == 1
    assert world.silhouette(frames, threshold=0.05).sum() == 2


def test_head_chart_by_hand():
    """Neutral pose: the head (drawn last, never occluded) stands upright, so along its axis column
    V = (tip0.y − y)/(tip0.y − tip1.y) with y the pixel centre, and U grows left to right."""
    outfit = world.random_outfit(3)
    pose = world.neutral_pose()
    video = world.render_video(outfit, pose, 160, 128)
    head_index = world.PARTS.index("head") + 1
    head = next(s for s in world.part_shapes(outfit, pose, 160, 128, world.fit_shrink(outfit, pose, 160, 128))
            if s.part == head_index)
    (x0, y0), (x1, y1) = head.tip0, head.tip1
    assert abs(x0 - x1) < 1e-9 and y1 < y0                      # upright: neck below crown
    col = int(x0)                                                # the pixel column holding the axis
    rows = [i for i in range(160) if video.parts[0, i, col] == head_index]
    assert len(rows) > 10
    for i in rows:
        expected = min(max((y0 - (i + 0.5)) / (y0 - y1), world.UV_MIN), 1.0)
        assert video.uv[0, 1, i, col].item() == pytest.approx(expected, abs=1e-5)
    assert all(np.diff(video.uv[0, 1, rows, col].numpy()) < 0)   # V rises towards the crown (rows go down)
    # across the head: U = ½ + (x − axis)/(2·half-width), increasing with x, ½ on the axis
    i = rows[len(rows) // 2]
    cols = [j for j in range(128) if video.parts[0, i, j] == head_index]
    u = video.uv[0, 0, i, cols].numpy()
    assert all(np.diff(u) > 0) and u[0] < 0.2 and u[-1] > 0.8
    assert video.uv[0, 0, i, col].item() == pytest.approx(0.5 + (col + 0.5 - x0) / (cols[-1] - cols[0] + 1), abs=0.06)


def test_limb_v_runs_from_proximal_to_distal():
    outfit = world.random_outfit(4)
    pose = world.neutral_pose()
    pose[world.POSE_PARAMS.index("shoulder_left")] = 1.2        # arm well away from the torso
    video = world.render_video(outfit, pose, 192, 128)
    index = world.PARTS.index("upper_arm_left") + 1
    shape = next(s for s in world.part_shapes(outfit, pose, 192, 128) if s.part == index)
    a, b = np.array(shape.tip0), np.array(shape.tip1)
    points = [a + t * (b - a) for t in np.linspace(0.15, 0.85, 8)]
    vs = []
    for x, y in points:
        i, j = int(y), int(x)
        if video.parts[0, i, j] == index:
            vs.append(video.uv[0, 1, i, j].item())
            assert vs[-1] == pytest.approx(np.dot(np.array([j + 0.5, i + 0.5]) - a, b - a) / np.dot(b - a, b - a),
                                           abs=1e-5)
    assert len(vs) >= 5 and all(np.diff(vs) > 0)


def test_colour_is_a_function_of_part_and_chart(videos):
    for outfit, video in videos.values():
        body = video.parts > 0
        painted = video.frames.permute(0, 2, 3, 1)[body].numpy()
        assert np.array_equal(painted, world.texture(outfit, video.parts[body].numpy(), video.uv[:, 0][body].numpy(),
                                                     video.uv[:, 1][body].numpy()))
        # across frames (different poses), pixels sharing (part, U, V) to 1/50 share their colour, bar pattern edges
        key = (video.parts[body] * 10_000 + (video.uv[:, 0][body] * 50).round().long() * 100
               + (video.uv[:, 1][body] * 50).round().long()).numpy()
        order = np.argsort(key, kind="stable")
        same = key[order][1:] == key[order][:-1]
        diff = np.abs(np.diff(painted[order], axis=0)).max(axis=1)[same]
        assert same.sum() > 500 and (diff < 0.06).mean() > 0.93


def test_outfits_show_their_garment():
    """Torso pixels carry the garment colours; a plain outfit is a single shaded colour there."""
    for seed in range(30):
        outfit = world.random_outfit(seed)
        if outfit.pattern == "plain":
            break
    torso = world.PARTS.index("torso") + 1
    u = np.full(5, 0.5, np.float32)
    v = np.linspace(0.1, 0.8, 5).astype(np.float32)
    rgb = world.texture(outfit, np.full(5, torso), u, v)
    assert np.allclose(rgb, np.asarray(outfit.top, np.float32), atol=1e-6)   # no shading on the centre line
    edge = world.texture(outfit, np.array([torso]), np.array([0.0], np.float32), np.array([0.5], np.float32))
    assert np.allclose(edge[0], np.asarray(outfit.top) * 0.82, atol=1e-5)


def test_motions_move_and_are_smooth(videos):
    for kind, (_, video) in videos.items():
        mask = world.body_mask(video.uv)
        mid = _iou(mask[0], mask[F // 2])
        consecutive = np.mean([_iou(mask[i], mask[i + 1]) for i in range(F - 1)])
        half_apart = np.mean([_iou(mask[i], mask[i + F // 2]) for i in range(F // 2)])
        assert mid < 0.9, kind
        assert consecutive > 0.5 and consecutive > half_apart + 0.05, kind
    for kind in world.MOTIONS:
        for seed in range(4):
            motion = world.random_motion(seed, 24, kind)
            assert np.abs(np.diff(motion, axis=0)).max() < 0.3, kind   # radians / fractions per frame


def test_body_fills_the_frame_and_stays_inside(videos):
    for kind, (_, video) in videos.items():
        mask = world.body_mask(video.uv)
        assert not (mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any()), kind
        rows = mask.any(dim=2)
        heights = [(torch.nonzero(r).max() - torch.nonzero(r).min() + 1).item() / H for r in rows]
        assert 0.6 <= min(heights) and max(heights) <= 0.96, kind
    standing = world.render_video(world.random_outfit(0), world.neutral_pose(), 200, 160)
    rows = torch.nonzero(world.body_mask(standing.uv)[0].any(dim=1)).flatten()
    assert (rows.max() - rows.min() + 1).item() / 200 == pytest.approx(world.FILL, abs=0.02)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (64, 200)])
def test_any_size_from_32(size):
    _, video = _video(2, frames=3, height=size[0], width=size[1])
    assert tuple(video.frames.shape[-2:]) == size and world.body_mask(video.uv).sum() > 20
    assert torch.equal(world.silhouette(video.frames), world.body_mask(video.uv))


def test_bad_input_is_refused():
    outfit = world.random_outfit(0)
    with pytest.raises(DreamPoseError, match="at least 1 frame"):
        world.random_motion(0, 0)
    with pytest.raises(DreamPoseError, match="unknown motion"):
        world.random_motion(0, 4, "moonwalk")
    with pytest.raises(DreamPoseError, match="≥ 0"):
        world.random_outfit(-1)
    with pytest.raises(DreamPoseError, match="≥ 32"):
        world.render_video(outfit, world.random_motion(0, 2), 31, 64)
    with pytest.raises(DreamPoseError, match="pose parameters"):
        world.render_video(outfit, np.zeros((2, 3)), 64, 64)
    with pytest.raises(DreamPoseError, match="NaN"):
        world.render_video(outfit, np.full((1, len(world.POSE_PARAMS)), np.nan), 64, 64)
    with pytest.raises(DreamPoseError, match="unknown split"):
        world.write_world_dataset("unused", videos=1, frames=1, height=64, width=64, split="holdout")


def test_video_folder_round_trip(tmp_path):
    _, video = _video(5, frames=3)
    folder = str(tmp_path / "clip")
    os.makedirs(folder)
    open(os.path.join(folder, "frame_7.png"), "wb").close()          # left by an earlier, longer attempt
    mp4 = str(tmp_path / "clip.mp4")
    world.write_video_folder(folder, video, fps=5.0, mp4=mp4, info={"note": "x"})
    (found,) = find_videos(str(tmp_path))
    assert len(found) == 3 and found.path == folder
    info = found.info()
    assert info["source"] == "synthetic world" and info["frames"] == 3 and info["note"] == "x"
    assert (info["height"], info["width"]) == (H, W)
    for i in range(3):
        expected = (video.frames[i] * 255).round().to(torch.uint8)
        assert torch.equal(load_frame(found.frames[i]), expected)
        assert torch.equal(load_pose(found.poses[i]), video.uv[i])
    cap = cv2.VideoCapture(mp4)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == W
    cap.release()


def test_split_seeds_never_meet():
    for seed in (0, 1, 9):
        train = {s for k in range(300) for s in world.world_seeds(seed, "train", k)}
        test = {s for k in range(300) for s in world.world_seeds(seed, "test", k)}
        assert len(train) == 600 and len(test) == 600 and not train & test
    outfit_seed, motion_seed = world.world_seeds(0, "train", 0)
    assert outfit_seed != motion_seed


class Interrupt(BaseException):
    """Stands for Ctrl-C or a killed process."""


def test_dataset_resumes_and_splits_differ(tmp_path, monkeypatch):
    root = str(tmp_path / "ds")
    calls = []
    folders = world.write_world_dataset(root, videos=1, frames=2, height=64, width=48, seed=3,
                                        progress=lambda *a: calls.append(a))
    assert [c[3] for c in calls] == [False] and calls[-1][:2] == (1, 1)

    def stop(*args, **kw):
        raise Interrupt

    with monkeypatch.context() as m:                          # the second video stops before its marker
        m.setattr(world, "write_marker", stop)
        with pytest.raises(Interrupt):
            world.write_world_dataset(root, videos=2, frames=2, height=64, width=48, seed=3)
    folders = [os.path.join(root, "train", f"world_000{k}") for k in range(2)]
    assert os.path.isfile(os.path.join(folders[1], world.PARTIAL)) and not os.path.exists(
        os.path.join(folders[1], MARKER))
    os.remove(os.path.join(folders[0], "frame_1.png"))       # a finished folder must not be touched again
    calls.clear()
    world.write_world_dataset(root, videos=3, frames=2, height=64, width=48, seed=3,
                              progress=lambda *a: calls.append(a))
    assert [c[3] for c in calls] == [True, False, False]
    assert not os.path.exists(os.path.join(folders[0], "frame_1.png"))
    assert os.path.exists(os.path.join(folders[1], MARKER))   # the interrupted one was redone
    assert not os.path.exists(os.path.join(folders[1], world.PARTIAL))
    test_folders = world.write_world_dataset(root, videos=3, frames=2, height=64, width=48, seed=3, split="test")
    assert os.path.dirname(test_folders[0]) == os.path.join(root, "test")

    def seeds(folder):
        with open(os.path.join(folder, MARKER)) as f:
            info = json.load(f)
        return info["outfit_seed"], info["motion_seed"]

    train_seeds = {s for f in folders[1:] for s in seeds(f)}
    assert not train_seeds & {s for f in test_folders for s in seeds(f)}
    assert len(find_videos(root)) == 6


def test_cli_writes_dataset_and_preview(tmp_path, capsys):
    out, preview = str(tmp_path / "synth"), str(tmp_path / "sheet.png")
    rc = main(["synth", "--out", out, "--videos", "2", "--frames", "3", "--height", "64", "--width", "48",
               "--seed", "1", "--split", "test", "--mp4", "--preview", preview])
    assert rc == 0
    captured = capsys.readouterr()
    assert "synth: 100%" in captured.err and "2/2" in captured.err   # one live bar over the videos
    assert captured.out.count("\n") == 1 and "2 written" in captured.out
    videos = find_videos(out)
    assert len(videos) == 2 and all(len(v) == 3 for v in videos)
    assert os.path.isfile(os.path.join(videos[0].path, "video.mp4"))
    sheet = load_frame(preview)
    assert tuple(sheet.shape) == (3, 2 * 2 * 64, 6 * 48)   # 2 videos × (frame + UV), 6 columns


@pytest.mark.parametrize("argv, message", [
    (["--frames", "0"], "--frames must be at least 1"),
    (["--height", "16"], "--height must be from 32 to 4096"),
    (["--width", "31"], "--width must be from 32 to 4096"),
    (["--preview", "sheet.jpg"], "--preview must name a .png"),
])
def test_cli_refuses_bad_input(tmp_path, capsys, argv, message):
    out = str(tmp_path / "synth")
    assert main(["synth", "--out", out, "--videos", "1", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_refuses_a_file_as_out(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["synth", "--out", str(path), "--videos", "1"]) == 2
    assert "is a file" in capsys.readouterr().err


def _files(folder) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), folder)] = f.read()
    return out


def test_dataset_refuses_files_no_synth_run_wrote(tmp_path):
    root = tmp_path / "ds"
    mine = root / "train" / "world_0001"
    mine.mkdir(parents=True)
    (mine / "frame_0.png").write_bytes(b"my own picture")       # someone else's frames, no marker, no job record
    (mine / "notes.txt").write_text("keep")
    before = _files(root)
    args = dict(videos=2, frames=2, height=64, width=48)
    with pytest.raises(DreamPoseError, match=r"world_0001 holds frame_0.png that no synth run wrote .*--force"):
        world.write_world_dataset(str(root), **args)
    assert _files(root) == before and not (root / "train" / "world_0000").exists()   # refused before any work
    (mine / world.PARTIAL).write_text(json.dumps({"job": {"seed": 99}}))    # an interrupted run of another job
    with pytest.raises(DreamPoseError, match="another synth run"):
        world.write_world_dataset(str(root), **args)
    world.write_world_dataset(str(root), force=True, **args)
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "frame_0.png").read_bytes() != b"my own picture"
    assert len(find_videos(str(root))) == 2 and not (mine / world.PARTIAL).exists()


def test_dataset_limits_are_checked_before_any_work(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    with pytest.raises(DreamPoseError, match=r"at most 4294967296 videos"):
        world.write_world_dataset(str(root), videos=10 ** 12, frames=2, height=64, width=64)
    with pytest.raises(DreamPoseError, match=r"10\*\*9|1000000000 video\(s\) .* on disk .*fewer --videos"):
        world.write_world_dataset(str(root), videos=10 ** 9, frames=2, height=64, width=64)
    monkeypatch.setattr(world, "free_memory", lambda: 2 ** 30)
    with pytest.raises(DreamPoseError, match=r"one video of 1000000000 frames at 64x64 needs about .* of memory and "
                                             r"only 1.0 GiB is available; ask for fewer --frames"):
        world.write_world_dataset(str(root), videos=1, frames=10 ** 9, height=64, width=64)
    assert not root.exists()
    # the disk must hold the videos still to write: finished ones of this job do not count
    per_video = 2 * 64 * 48 * world.DISK_PER_PIXEL + 2 * 512 + 8192
    world.write_world_dataset(str(root), videos=2, frames=2, height=64, width=48)
    monkeypatch.setattr(world, "_free_disk", lambda path: 2 * per_video)
    with pytest.raises(DreamPoseError, match=r"3 video\(s\) of 2 frames at 48x64 need about"):
        world.write_world_dataset(str(root), videos=5, frames=2, height=64, width=48)
    assert len(find_videos(str(root))) == 2
    world.write_world_dataset(str(root), videos=4, frames=2, height=64, width=48)
    assert len(find_videos(str(root))) == 4


def test_cli_refuses_a_huge_request_before_any_work(tmp_path, capsys):
    out = tmp_path / "synth"
    for argv in (["--frames", "1000000000"], ["--videos", "1000000000"]):
        assert main(["synth", "--out", str(out), "--height", "64", "--width", "64", "--quiet", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and ("of memory" in err or "on disk" in err) and "fewer" in err
    assert not out.exists()


def test_cli_preview_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "synth"
    base = ["synth", "--out", str(out), "--videos", "1", "--frames", "2", "--height", "64", "--width", "64",
            "--split", "test", "--quiet"]
    holiday = tmp_path / "holiday.png"
    holiday.write_bytes(b"not a contact sheet")
    assert main([*base, "--preview", str(holiday)]) == 2
    assert "--preview" in capsys.readouterr().err and holiday.read_bytes() == b"not a contact sheet"
    assert not out.exists()                                         # refused before any work
    video = out / "test" / "world_0000"
    for argv in (["--preview", str(video / "frame_0.png")],           # a frame this same run writes
                 ["--preview", str(video / "sheet.png")],             # in a folder whose frame files it replaces
                 ["--out", str(tmp_path / "o.png"), "--preview", str(tmp_path / "o.png")]):   # --out itself
        assert main([*base, *argv]) == 2
        assert "--preview" in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "o.png").exists()
    sheet = tmp_path / "sheet.png"
    assert main([*base, "--preview", str(sheet)]) == 0
    first = sheet.read_bytes()
    assert main([*base, "--preview", str(sheet)]) == 0                # a rerun of the job may rewrite its own sheet
    assert sheet.read_bytes() == first
    assert main([*base, "--seed", "5", "--force", "--preview", str(sheet)]) == 0   # another job: only with --force
    assert main([*base, "--preview", str(holiday)]) == 2
    assert main([*base, "--force", "--preview", str(holiday)]) == 0
    assert load_frame(str(holiday)).shape[-2:] == load_frame(str(sheet)).shape[-2:]
    capsys.readouterr()
    assert main([*base, "--seed", "6", "--preview", str(sheet)]) == 2
    assert "already exists" in capsys.readouterr().err
