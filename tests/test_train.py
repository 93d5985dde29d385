"""Stage-1 training (`python -m dreampose train`) on tiny models and a tiny prepared dataset.

Three videos of five 72×56 frames with 36×28 DensePose UV (so the target resize and the pose
resize both do work) train at 64×64 (latent 8×8); the condition still runs at 640×512, as the
adapter requires. Every in-process run takes a second or two on 2 CPU cores; the two-process runs
(gloo, through torchrun) take about ten seconds each.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreampose.cli import main as cli
from dreampose.training import stage1 as tr
from dreampose.files.weights import read_metadata
from dreampose.pipeline.conditioning import VAE_SCALE
from dreampose.data.dataset import (
    find_videos,
    frame_file_name,
    load_frame,
    load_pose,
    write_marker,
)
from dreampose.errors import DreamPoseError
from dreampose.pipeline.images import clip_pixels, resize_u8
from dreampose.loaders.load import load_dreampose
from dreampose.pipeline.poses import make_pose_windows, uv_file_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDEOS, FRAMES = 3, 5


@pytest.fixture(scope="module")
def videos_root(tmp_path_factory) -> str:
    """3 prepared videos × 5 frames: random RGB 72×56 frames, UV 36×28 with a zero background band."""
    root = str(tmp_path_factory.mktemp("prepared"))
    rng = np.random.default_rng(0)
    for v in range(VIDEOS):
        folder = os.path.join(root, f"clip_{v}")
        os.makedirs(folder)
        for n in range(FRAMES):
            Image.fromarray(rng.integers(0, 256, (72, 56, 3), dtype=np.uint8)).save(
                os.path.join(folder, frame_file_name(n)))
            uv = rng.random((2, 36, 28)).astype(np.float32)
            uv[:, :6] = 0
            np.save(os.path.join(folder, uv_file_name(n)), uv, allow_pickle=False)
        write_marker(folder, frames=FRAMES)
    return root


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """accelerate's settings are process-wide: every test gets a clean slate. One thread: these
    networks are too small to gain from more, and on a shared 2-core machine spinning OpenMP
    threads made the runs ten times slower."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def config(videos_root, out, tiny_sd_folder, tiny_clip_folder, **kw) -> tr.TrainConfig:
    base = {"data": [videos_root], "out": str(out), "base": tiny_sd_folder, "clip": tiny_clip_folder, "steps": 2,
            "batch_size": 4, "micro_batch": 2, "lr": 1e-3, "height": 64, "width": 64, "cpu": True,
            "cache_conditioning": True, "save_every": 100, "log_every": 1, "workers": 0}
    return tr.TrainConfig(**{**base, **kw})


def run(cfg: tr.TrainConfig) -> tr.TrainResult:
    return tr.train(cfg, log=lambda _: None, progress=False)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def state_of(model) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    out.update({f"adapter.{k}": v for k, v in model.adapter.state_dict().items()})
    return out


# ------------------------------------------------------------------------------------------ pure parts

def test_grad_accumulation_is_computed_and_must_divide():
    assert tr.grad_accumulation(16, 2, 1) == 8
    assert tr.grad_accumulation(16, 2, 2) == 4
    assert tr.grad_accumulation(16, 2, 8) == 1
    with pytest.raises(DreamPoseError, match=r"--batch-size 16 is not a multiple of --micro-batch 3 × 1"):
        tr.grad_accumulation(16, 3, 1)
    with pytest.raises(DreamPoseError, match=r"micro-batch 2 × 3 process"):
        tr.grad_accumulation(16, 2, 3)


def test_config_problems_are_reported_before_any_work(tmp_path):
    bad = tr.TrainConfig(data=[str(tmp_path)], out=str(tmp_path / "o"), clip=None, base=None, height=100,
                         pose_window=3, conditioning="vae", dropout=1.5)
    with pytest.raises(DreamPoseError) as exc:
        tr.check_config(bad)
    text = str(exc.value)
    for words in ("--clip is required", "give --base", "pose_window must be 5", "conditioning must be one of",
                  "dropout must be in", "multiples of 64"):
        assert words in text


def test_cli_rejects_an_uneven_batch_before_loading(videos_root, tmp_path, capsys):
    dummy = tmp_path / "models"             # never read: the batch is refused first (--out is not inside it)
    dummy.mkdir()
    code = cli.main(["train", "--data", videos_root, "--out", str(tmp_path / "o"), "--base", str(dummy),
                     "--clip", str(dummy), "--batch-size", "5", "--micro-batch", "2", "--cpu"])
    assert code == 2
    assert "--batch-size 5 is not a multiple of --micro-batch 2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


def test_draws_are_keyed_by_seed_step_micro_rank():
    frames = tr.FrameIndex([5, 1, 3])
    cfg = tr.TrainConfig(data=["x"], out="y", micro_batch=3, height=64, width=64)
    a = tr.draw_micro_batch(frames, cfg, 7, 1, 0)
    b = tr.draw_micro_batch(frames, cfg, 7, 1, 0)
    assert a.samples == b.samples and torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)
    for other in (tr.draw_micro_batch(frames, cfg, 7, 1, 1), tr.draw_micro_batch(frames, cfg, 7, 2, 0),
                  tr.draw_micro_batch(frames, cfg, 8, 1, 0)):
        assert not torch.equal(a.noise, other.noise)
    assert a.target_noise.shape == (3, 4, 8, 8) and a.cond_noise.shape == (3, 4, 80, 64)
    for key in range(300):
        for v, j, i in tr.draw_samples(frames, tr.step_generator(0, key, 0, 0), 4, 0.15).samples:
            assert 0 <= j < frames.counts[v] and 0 <= i < frames.counts[v]
            assert (i == j) == (frames.counts[v] == 1)   # another frame of the same video when there is one
    assert [frames.locate(g) for g in (0, 4, 5, 6, 8)] == [(0, 0), (0, 4), (1, 0), (2, 0), (2, 2)]


def test_dropout_is_per_sample_five_five_five():
    frames = tr.FrameIndex([FRAMES] * VIDEOS)
    counts = {"image": 0, "pose": 0, "both": 0, "none": 0}
    n = 0
    mixed_batches = 0
    for key in range(6000):
        d = tr.draw_samples(frames, tr.step_generator(3, key, 0, 0), 5, 0.15)
        flags = list(zip(d.drop_image.tolist(), d.drop_pose.tolist()))
        mixed_batches += len(set(flags)) > 1
        for image, pose in flags:
            counts["both" if image and pose else "image" if image else "pose" if pose else "none"] += 1
            n += 1
    for kind in ("image", "pose", "both"):   # 30000 samples: σ ≈ 0.0013, the bound is ±6σ
        assert abs(counts[kind] / n - 0.05) < 0.008, counts
    assert mixed_batches > 1000   # decided per sample, not per batch
    assert tr.dropout_flags(0.0, 0.15) == (False, True) and tr.dropout_flags(0.06, 0.15) == (True, False)
    assert tr.dropout_flags(0.11, 0.15) == (True, True) and tr.dropout_flags(0.15, 0.15) == (False, False)


# ------------------------------------------------------------------------------------------ batches

@pytest.mark.parametrize("pose_window", [5, 1])
def test_batch_matches_what_the_sampler_builds(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder, pose_window):
    cfg = config(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder, pose_window=pose_window, micro_batch=4)
    model = tr.load_training_model(cfg)
    videos = find_videos([videos_root])
    draws = tr.draw_micro_batch(tr.FrameIndex([len(v) for v in videos]), cfg, 0, 0, 0)
    draws.samples = [(0, 0, 3), (1, 2, 1), (2, 4, 0), (1, 3, 3)]
    draws.drop_image = torch.tensor([False, True, False, True])
    draws.drop_pose = torch.tensor([False, False, True, True])
    data = tr.TrainData(videos, model.vae, model.clip, cfg, "cpu", cache=False)
    batch = data.batch(draws)
    with torch.no_grad():
        black = clip_pixels(torch.zeros(1, 3, 640, 512, dtype=torch.uint8))
        null_clip = model.clip(pixel_values=black).last_hidden_state[0]
        null_dist = model.vae.encode(torch.full((1, 3, 640, 512), -1.0)).latent_dist
    for b, (v, j, i) in enumerate(draws.samples):
        uv = torch.stack([load_pose(p) for p in videos[v].poses])
        windows = make_pose_windows(uv, 64, 64, cfg.offsets).windows([j])[0]
        if draws.drop_pose[b]:
            assert torch.equal(batch.pose[b], torch.zeros(10, 8, 8))
        else:
            assert torch.equal(batch.pose[b], windows)
            if pose_window == 1:   # the paper's 1-pose ablation: pose j in all five slots
                centre = make_pose_windows(uv[j:j + 1], 64, 64).uv[0]
                for slot in range(5):
                    assert torch.equal(batch.pose[b, 2 * slot:2 * slot + 2], centre)
            else:
                assert not torch.equal(batch.pose[b, :2], batch.pose[b, 8:])
        if draws.drop_image[b]:   # the sampler's null image: CLIP of a black frame, VAE of a −1 frame
            assert torch.equal(batch.clip_tokens[b], null_clip)
            want = (null_dist.mean[0] + null_dist.std[0] * draws.null_noise[b]) * VAE_SCALE
            assert torch.equal(batch.cond_latent[b], want)
        else:
            key = resize_u8(load_frame(videos[v].frames[i]).unsqueeze(0), 640, 512)
            with torch.no_grad():
                tokens = model.clip(pixel_values=clip_pixels(key)).last_hidden_state[0]
                dist = model.vae.encode(key.float() / 255 * 2 - 1).latent_dist
            assert torch.equal(batch.clip_tokens[b], tokens)
            assert torch.equal(batch.cond_latent[b], (dist.mean[0] + dist.std[0] * draws.cond_noise[b]) * VAE_SCALE)
    # caching the frozen encodings changes no number
    cached = tr.TrainData(videos, model.vae, model.clip, cfg, "cpu", cache=True)
    for _ in range(2):
        again = cached.batch(draws)
        for name in ("z0", "pose", "clip_tokens", "cond_latent", "noise", "timesteps"):
            assert torch.equal(getattr(again, name), getattr(batch, name)), name


# ------------------------------------------------------------------------------------------ training

def test_train_changes_unet_and_adapter_only(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder):
    cfg = config(videos_root, tmp_path / "run", tiny_sd_folder, tiny_clip_folder, workers=2, include_vae=True)
    result = run(cfg)
    assert result.steps == 2 and result.grad_accum == 2 and len(result.losses) == 2
    assert all(np.isfinite(result.losses))
    fresh = tr.load_training_model(cfg)
    before, after = state_of(fresh), state_of(result.model)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged[:5]
    for name in ("vae", "clip"):
        trained, original = getattr(result.model, name), getattr(fresh, name)
        assert all(p.grad is None for p in trained.parameters())
        for k, v in original.state_dict().items():
            assert torch.equal(trained.state_dict()[k], v), (name, k)
    # the bundle: loadable, the trained weights, what eval needs in its metadata
    path = os.path.join(cfg.out, tr.FINAL_NAME)
    meta = read_metadata(path)
    assert (meta["pose_window"], meta["conditioning"], meta["resolution"], meta["convention"]) == \
        ("5", "clip-vae", "64x64", "standard")
    training = json.loads(meta["training"])
    assert training["batch_size"] == 4 and training["grad_accum"] == 2 and training["world_size"] == 1
    loaded = load_dreampose(clip=tiny_clip_folder, dreampose=path)
    for k, v in state_of(loaded).items():
        assert torch.equal(v, after[k]), k
    assert torch.equal(loaded.vae.encoder.conv_in.weight, fresh.vae.encoder.conv_in.weight)
    log = read_jsonl(os.path.join(cfg.out, tr.LOG_NAME))
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) and r["lr"] == 1e-3 for r in log)


def test_clip_only_holds_the_vae_path_at_zero(videos_root, tmp_path, tiny_dreampose_file, tiny_clip_folder):
    """CLIP-only ablation from a bundle whose adapter uses its VAE tokens: they are zeroed and stay zero."""
    start = load_dreampose(clip=tiny_clip_folder, dreampose=tiny_dreampose_file).adapter
    assert start.linear1.weight[:, 50:].abs().sum() > 0
    cfg = config(videos_root, tmp_path / "run", None, tiny_clip_folder, init=tiny_dreampose_file,
                 conditioning="clip", pose_window=1, dropout=0.5)
    result = run(cfg)
    adapter = result.model.adapter
    assert torch.equal(adapter.linear1.weight[:, 50:], torch.zeros(50, 4))
    assert not torch.equal(adapter.linear1.weight[:, :50], start.linear1.weight[:, :50])
    assert torch.equal(adapter.vae2clip.weight, start.vae2clip.weight)
    meta = read_metadata(os.path.join(cfg.out, tr.FINAL_NAME))
    assert (meta["pose_window"], meta["conditioning"]) == ("1", "clip")
    saved = load_file(os.path.join(cfg.out, tr.FINAL_NAME))
    assert torch.equal(saved["adapter.linear1.weight"][:, 50:], torch.zeros(50, 4))


def test_exact_resume(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder):
    """4 steps straight == 2 steps, stop, --resume latest, 2 more (bit for bit)."""
    common = {"steps": 4, "save_every": 1, "keep": 2, "dropout": 0.5}
    straight = run(config(videos_root, tmp_path / "a", tiny_sd_folder, tiny_clip_folder, **common))
    ckpts = tmp_path / "a" / tr.CHECKPOINTS
    assert sorted(os.listdir(ckpts)) == ["step_3", "step_4"]   # --keep 2
    assert os.path.isfile(tmp_path / "a" / "dreampose_step_1.safetensors")

    out = tmp_path / "b"
    first = run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, **{**common, "steps": 2}))
    assert first.steps == 2
    os.makedirs(out / tr.CHECKPOINTS / "step_9")            # incomplete: no train_state.json
    os.makedirs(out / tr.CHECKPOINTS / ".tmp-step_3")       # an interrupted save
    with open(out / tr.LOG_NAME, "a") as f:                 # a step logged after the last checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    assert tr.find_checkpoint(str(out), "latest").endswith("step_2")
    resumed = run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, **common, resume="latest"))
    assert resumed.start_step == 2 and resumed.steps == 4
    a, b = state_of(straight.model), state_of(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.losses[2:] == resumed.losses
    assert not os.path.exists(out / tr.CHECKPOINTS / ".tmp-step_3")
    log = read_jsonl(out / tr.LOG_NAME)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[2]["loss"] != 9.0
    final_a, final_b = load_file(tmp_path / "a" / tr.FINAL_NAME), load_file(out / tr.FINAL_NAME)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_refuses_another_run(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder):
    out = tmp_path / "run"
    run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=1, batch_size=2))
    with pytest.raises(DreamPoseError) as exc:
        run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=2, resume="latest", seed=1,
                   batch_size=4))
    assert "differs in batch_size, seed" in str(exc.value)
    with pytest.raises(DreamPoseError, match="already holds checkpoints"):
        run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=2, batch_size=2))
    fewer = tmp_path / "fewer"   # another dataset: one video less
    shutil.copytree(videos_root, fewer)
    shutil.rmtree(fewer / "clip_2")
    with pytest.raises(DreamPoseError, match="differs in dataset, videos, frames"):
        run(config(str(fewer), out, tiny_sd_folder, tiny_clip_folder, steps=2, batch_size=2, resume="latest"))


# ------------------------------------------------------------------------------------------ two processes

def _torchrun(args: list[str], timeout: float = 150) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dreampose", "train", *args]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _debug(folder) -> dict[int, list[dict]]:
    return {rank: read_jsonl(os.path.join(folder, f"rank{rank}.jsonl")) for rank in (0, 1)}


def test_two_processes_gloo(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder):
    """Two CPU ranks (gloo): both train on their own samples, agree on the weights after every step,
    keep the effective batch, and a resumed two-process run continues the same run."""
    common = ["--data", videos_root, "--base", tiny_sd_folder, "--clip", tiny_clip_folder, "--height", "64",
              "--width", "64", "--batch-size", "4", "--micro-batch", "1", "--steps", "4", "--save-every", "2",
              "--lr", "1e-3", "--cpu", "--cache-conditioning", "--workers", "0", "--log-every", "1", "--quiet"]
    _torchrun([*common, "--out", str(tmp_path / "a"), "--debug-dir", str(tmp_path / "dbg_a")])
    straight = _debug(tmp_path / "dbg_a")
    for rank in (0, 1):
        assert [r["step"] for r in straight[rank]] == [1, 2, 3, 4]
        for r in straight[rank]:
            assert r["world_size"] == 2 and r["grad_accum"] == 2   # 4 = micro 1 × accumulation 2 × 2 ranks
            assert len(r["samples"]) == 2 and all(len(m) == 1 for m in r["samples"])
            assert np.isfinite(r["loss"])
    for s in range(4):
        assert straight[0][s]["digest"] == straight[1][s]["digest"]
        assert straight[0][s]["loss"] != straight[1][s]["loss"]
    assert len({r["digest"] for r in straight[0]}) == 4
    assert [r["samples"] for r in straight[0]] != [r["samples"] for r in straight[1]]
    log = read_jsonl(tmp_path / "a" / tr.LOG_NAME)
    assert [r["step"] for r in log] == [1, 2, 3, 4]          # the main process alone writes the log
    assert sorted(os.listdir(tmp_path / "a" / tr.CHECKPOINTS / "step_2")) == sorted(
        ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", tr.STATE_NAME])

    _torchrun([*common, "--out", str(tmp_path / "b"), "--debug-dir", str(tmp_path / "dbg_b"),
               "--resume", str(tmp_path / "a" / tr.CHECKPOINTS / "step_2")])
    resumed = _debug(tmp_path / "dbg_b")
    for rank in (0, 1):
        assert [r["step"] for r in resumed[rank]] == [3, 4]
        assert resumed[rank] == straight[rank][2:]


# ------------------------------------------------------------------------------------------ faults

def test_resume_falls_back_to_the_newest_checkpoint_that_loads(videos_root, tmp_path, tiny_sd_folder,
                                                               tiny_clip_folder):
    common = {"steps": 4, "save_every": 1, "keep": 2}
    straight = run(config(videos_root, tmp_path / "a", tiny_sd_folder, tiny_clip_folder, **common))
    out = tmp_path / "b"
    run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, **{**common, "steps": 3}))
    newest = out / tr.CHECKPOINTS / "step_3"
    weights = max((p for p in newest.iterdir() if p.is_file() and p.name != tr.STATE_NAME),
                  key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])      # a save cut short
    messages = []
    resumed = tr.train(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, **common, resume="latest"),
                       log=messages.append, progress=False)
    assert resumed.start_step == 2
    warning = [m for m in messages if m.startswith("warning: checkpoint")]
    assert len(warning) == 1 and str(newest) in warning[0] and "resuming from the previous one" in warning[0]
    a, b = state_of(straight.model), state_of(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)          # the fallback resumes exactly
    for path in (out / tr.CHECKPOINTS).iterdir():            # every checkpoint broken: a clear error
        for f in path.iterdir():
            if f.name != tr.STATE_NAME:
                f.write_bytes(b"")
    with pytest.raises(DreamPoseError, match="no checkpoint loads"):
        run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, **{**common, "steps": 6}, resume="latest"))


def test_resume_with_a_new_learning_rate_applies_it_and_says_so(videos_root, tmp_path, tiny_sd_folder,
                                                                tiny_clip_folder):
    out = tmp_path / "run"
    run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=2, save_every=2))
    messages = []
    tr.train(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=3, save_every=2, lr=5e-4,
                    resume="latest"), log=messages.append, progress=False)
    assert any(m.startswith("resume: lr 0.001 in the checkpoint, now 0.0005 (applied from step 3)")
               for m in messages), messages
    log = read_jsonl(out / tr.LOG_NAME)
    assert [r["lr"] for r in log] == [1e-3, 1e-3, 5e-4]


def test_unreadable_frames_are_found_before_the_first_step(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder):
    root = tmp_path / "data"
    shutil.copytree(videos_root, root)
    png = root / "clip_1" / frame_file_name(3)
    png.write_bytes(png.read_bytes()[:200])                     # truncated
    with pytest.raises(DreamPoseError, match=r"bad data in .*clip_1: frame_3\.png is not a readable image"):
        run(config(str(root), tmp_path / "strict", tiny_sd_folder, tiny_clip_folder, strict=True))
    assert not (tmp_path / "strict" / tr.LOG_NAME).exists()    # stopped before any step
    np.save(root / "clip_2" / uv_file_name(0), np.full((2, 36, 28), np.nan, np.float32), allow_pickle=False)
    messages = []
    result = tr.train(config(str(root), tmp_path / "skip", tiny_sd_folder, tiny_clip_folder), log=messages.append,
                      progress=False)
    assert result.steps == 2
    assert any("skipping video" in m and "clip_1" in m and "frame_3.png" in m for m in messages)
    assert any("skipping video" in m and "clip_2" in m and "NaN" in m for m in messages)
    assert "skipped 2 of 3 video(s) with unreadable frames or poses" in messages
    assert any("1 video(s), 5 frame(s)" in m for m in messages)


@pytest.mark.parametrize("kill_after", ["step_1", "step_2/" + "model.safetensors"])
def test_kill_9_mid_run_leaves_a_run_that_resumes(kill_after, videos_root, tmp_path, tiny_sd_folder,
                                                  tiny_clip_folder):
    """SIGKILL (no cleanup runs) as soon as a checkpoint appears, i.e. while the next steps or saves run:
    the next `--resume latest` continues from a complete checkpoint and finishes the run."""
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "dreampose", "train", "--data", videos_root, "--base", tiny_sd_folder, "--clip",
            tiny_clip_folder, "--height", "64", "--width", "64", "--batch-size", "2", "--micro-batch", "2",
            "--steps", "8", "--save-every", "1", "--lr", "1e-3", "--cpu", "--workers", "0", "--quiet",
            "--out", str(out), "--resume", "latest"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / tr.CHECKPOINTS / kill_after
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert os.path.isfile(out / tr.FINAL_NAME)
    assert [r["step"] for r in read_jsonl(out / tr.LOG_NAME)][-1] == 8
    assert not [n for n in os.listdir(out / tr.CHECKPOINTS) if n.startswith(".tmp-") or n.endswith(".old")]


class _Payload:
    """A pickle that would run a command when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_keep_exports_keeps_only_the_newest_step_files(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder):
    """Each dreampose_step_N.safetensors is a whole model: --keep-exports N leaves the newest N (0: every one)."""
    out = tmp_path / "run"
    run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=3, save_every=1, keep=1, keep_exports=2))
    assert sorted(f for f in os.listdir(out) if f.startswith("dreampose")) == [
        "dreampose.safetensors", "dreampose_step_2.safetensors", "dreampose_step_3.safetensors"]
    assert sorted(os.listdir(out / tr.CHECKPOINTS)) == ["step_3"]
    bad = config(videos_root, tmp_path / "x", tiny_sd_folder, tiny_clip_folder, keep_exports=-1)
    assert "keep_exports must be a whole number ≥ 0 (got -1)" in bad.problems()


@pytest.mark.parametrize("name, said", [
    ("optimizer.bin", "step_2 does not load (UnpicklingError"),
    # accelerate itself would skip a refused RNG state in silence: it is checked first, and reported
    ("random_states_0.pkl", "step_2 does not load (random_states_0.pkl is refused: it names posix.system"),
])
def test_a_refused_pickle_in_a_checkpoint_is_reported_and_skipped(name, said, videos_root, tmp_path, tiny_sd_folder,
                                                                  tiny_clip_folder):
    common = {"steps": 3, "save_every": 1, "keep": 2}
    out = tmp_path / "run"
    run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, **{**common, "steps": 2}))
    marker = tmp_path / "ran"
    torch.save({"state": _Payload(str(marker))}, out / tr.CHECKPOINTS / "step_2" / name)
    messages = []
    resumed = tr.train(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, **common, resume="latest"),
                       log=messages.append, progress=False)
    assert not marker.exists()                                   # never unpickled as code
    assert resumed.start_step == 1
    assert any(said in m and "resuming from the previous one" in m for m in messages), messages


# ------------------------------------------------------------------------------------------ outputs

def _snapshot(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_an_init_bundle_in_out_is_refused_even_with_force(videos_root, tmp_path, tiny_clip_folder,
                                                           tiny_dreampose_file, capsys):
    """--out holding the --init bundle under an output name: the run would overwrite its own input."""
    out = tmp_path / "models"
    out.mkdir()
    init = shutil.copy(tiny_dreampose_file, out / tr.FINAL_NAME)
    before = _snapshot(out)
    code = cli.main(["train", "--data", videos_root, "--init", str(init), "--clip", tiny_clip_folder, "--out",
                     str(out), "--steps", "1", "--batch-size", "2", "--micro-batch", "2", "--height", "64",
                     "--width", "64", "--cpu", "--workers", "0", "--quiet", "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("dreampose train: error: --out") and f"--init {init}" in err[0] and str(out) in err[0]
    assert _snapshot(out) == before                              # nothing written, the input intact


@pytest.mark.parametrize("layout", ["out-is-data", "out-inside-data", "out-holds-data"])
def test_out_and_data_folders_stay_apart(layout, videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder):
    data = tmp_path / "project" / "data"
    shutil.copytree(videos_root, data)
    out = {"out-is-data": data, "out-inside-data": data / "run", "out-holds-data": tmp_path / "project"}[layout]
    before = _snapshot(tmp_path / "project")
    with pytest.raises(DreamPoseError, match=f"--out {re.escape(str(out))} .*the input --data {re.escape(str(data))}"):
        run(config(str(data), out, tiny_sd_folder, tiny_clip_folder, steps=1))
    with pytest.raises(DreamPoseError, match="the input --data"):   # --force does not change that
        tr.train(config(str(data), out, tiny_sd_folder, tiny_clip_folder, steps=1), log=lambda _: None,
                 progress=False, force=True)
    assert _snapshot(tmp_path / "project") == before


def test_unrelated_files_in_out_are_refused_unless_forced(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder,
                                                          tiny_dreampose_file):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / tr.LOG_NAME).write_text("my notes, not JSON\n")
    with pytest.raises(DreamPoseError, match=r"already holds train_log\.jsonl \(no line of it is a training-log "
                                             r"record\), which this run did not write; pass --force"):
        run(config(videos_root, notes, tiny_sd_folder, tiny_clip_folder, steps=1, batch_size=2))
    assert (notes / tr.LOG_NAME).read_text() == "my notes, not JSON\n" and not (notes / tr.CHECKPOINTS).exists()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(tiny_dreampose_file, bundle / "dreampose_step_1.safetensors")
    with pytest.raises(DreamPoseError, match=r"already holds dreampose_step_1\.safetensors \(of another run"):
        run(config(videos_root, bundle, tiny_sd_folder, tiny_clip_folder, steps=1, batch_size=2, resume="latest"))
    result = tr.train(config(videos_root, notes, tiny_sd_folder, tiny_clip_folder, steps=1, batch_size=2),
                      log=lambda _: None, progress=False, force=True)
    assert result.steps == 1 and [r["step"] for r in read_jsonl(notes / tr.LOG_NAME)] == [1]


def test_resume_keeps_the_valid_records_of_a_damaged_log(videos_root, tmp_path, tiny_sd_folder, tiny_clip_folder):
    """A line cut short by a kill, or garbage: dropped with a warning that names the file; the records stay."""
    out = tmp_path / "run"
    common = {"batch_size": 2, "save_every": 1}
    run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=2, **common))
    log = out / tr.LOG_NAME
    with open(log, "ab") as f:
        f.write(b'{truncated line\n\xff\xfe not text\n')
    messages = []
    resumed = tr.train(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=3, resume="latest", **common),
                       log=messages.append, progress=False)
    assert resumed.start_step == 2 and resumed.steps == 3
    assert f"warning: {log}: dropped 2 line(s) that are no log record (line 3, 4); kept 2 record(s) up to step 2" \
        in messages, messages
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]
    log.write_text("not a log at all\n")                        # nothing of it a record: not the run's log
    with pytest.raises(DreamPoseError, match="already holds train_log.jsonl"):
        run(config(videos_root, out, tiny_sd_folder, tiny_clip_folder, steps=4, resume="latest", **common))


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.bin"])
def test_a_checkpoint_over_the_file_size_limit_ends_in_one_line(failing, videos_root, tmp_path, tiny_sd_folder,
                                                                tiny_clip_folder):
    """``ulimit -f`` while accelerate saves the checkpoint: safetensors (SafetensorError, os error 27) or
    torch.save (a RuntimeError without errno) fails; one line, exit 2, no temporary folder left."""
    import resource

    cfg = config(videos_root, tmp_path / "o", tiny_sd_folder, tiny_clip_folder)
    model = tr.load_training_model(cfg)
    weights = sum(p.numel() * 4 for m in (model.unet, model.adapter) for p in m.parameters())
    # the model file is about `weights` bytes, the AdamW state twice that
    limit = 64 * 1024 if failing == "model.safetensors" else int(weights * 1.3)

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "o"
    args = [sys.executable, "-m", "dreampose", "train", "--data", videos_root, "--base", tiny_sd_folder, "--clip",
            tiny_clip_folder, "--height", "64", "--width", "64", "--batch-size", "2", "--micro-batch", "2",
            "--steps", "1", "--cpu", "--workers", "0", "--quiet", "--out", str(out)]
    proc = subprocess.run(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                          preexec_fn=limited, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith(f"dreampose train: error: could not write {out / tr.CHECKPOINTS / 'step_1'}")
    assert "ulimit -f" in last
    assert os.listdir(out / tr.CHECKPOINTS) == [] and not (out / tr.FINAL_NAME).exists()
