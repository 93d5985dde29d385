"""`python -m dreampose eval` end to end on tiny random models and a tiny prepared dataset.

The dataset is written here: 2 videos × 3 frames of 64×64, a random-coloured body box on the
synthetic world's plain background with random UV on the same box. Bundles are one tiny model
saved three ways: the full model (pose window 5), a CLIP-only stand-in (its adapter gives the VAE
tokens zero weight) and the 1-pose model (same weights, pose_window 1), so the rows differ exactly
by what the ablation changes. Runs use 2 sampler steps and 2 finetune steps: seconds, not minutes.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dreampose.cli import main as cli
from dreampose.evaluation import evaluate as E
from dreampose.evaluation import metrics as M
from dreampose.data.dataset import write_marker
from dreampose.demo.tiny import tiny_dreampose

SIZE, FRAMES, STEPS, FT = 64, 3, 2, 2
BACKGROUND = (0.92, 0.92, 0.92)


def run(*args) -> int:
    return cli.main(["eval", *[str(a) for a in args]])


def write_video(folder, seed: int, size=SIZE, uv_size=None, frames=FRAMES) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    uv_size = uv_size or size
    for i in range(frames):
        img = np.tile(np.array(BACKGROUND) * 255, (size, size, 1))
        uv = np.zeros((2, uv_size, uv_size), np.float32)
        bh, bw = size * 15 // 32, size * 10 // 32   # 30×20 at 64×64
        top, left = size // 6 + 3 * i + seed, size // 4 + 4 * i
        img[top:top + bh, left:left + bw] = rng.integers(0, 120, (bh, bw, 3))
        if uv_size == size:
            uv[:, top:top + bh, left:left + bw] = rng.uniform(0.05, 1.0, (2, bh, bw))
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(folder, f"frame_{i}.png"))
        np.save(os.path.join(folder, f"frame_{i}_densepose.npy"), uv)
    write_marker(folder, source="test")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip_folder):
    root = tmp_path_factory.mktemp("eval")
    data = root / "test"
    for v in range(2):
        write_video(data / f"video{v}", seed=v)
    model = tiny_dreampose(seed=0)
    full = model.save(str(root / "full.safetensors"), include_vae=True, pose_window="5")
    onepose = model.save(str(root / "onepose.safetensors"), include_vae=True, pose_window="1")
    clip_only = tiny_dreampose(seed=0)
    with torch.no_grad():
        clip_only.adapter.linear1.weight[:, clip_only.adapter.clip_tokens:] = 0
    clip = clip_only.save(str(root / "clip.safetensors"), include_vae=True, pose_window="5")
    return {"root": root, "data": str(data), "clip": tiny_clip_folder, "full": full, "onepose": onepose,
            "clip_only": clip}


def common(s, out, *extra):
    return ["--data", s["data"], "--clip", s["clip"], "--out", out, "--steps", STEPS, "--frames-per-batch", 2,
            "--no-discover", "--quiet", "--threads", 2, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def ablation(setup):
    out = setup["root"] / "ablation"
    rc = run(*common(setup, out, "--finetune-steps", FT, "--vae-finetune-steps", FT, "--save-frames",
                     "--ablation", f"full={setup['full']}", f"clip={setup['clip_only']}",
                     f"onepose={setup['onepose']}"))
    assert rc == 0
    with open(out / "metrics.json") as f:
        return out, json.load(f)


@pytest.fixture(scope="module")
def single(setup):
    out = setup["root"] / "single"
    assert run(*common(setup, out, "--dreampose", setup["full"], "--save-frames")) == 0
    with open(out / "metrics.json") as f:
        return out, json.load(f)


# --------------------------------------------------------------------------------------------- single model

def test_single_json_structure(single):
    out, result = single
    assert result["mode"] == "single" and result["videos"] == ["video0", "video1"]
    row = result["rows"]["model"]
    assert set(row["videos"]) == {"video0", "video1"}
    for rec in row["videos"].values():
        assert rec["frames"] == 3 and rec["key_frame"] == 0 and rec["frames_evaluated"] == 2
        assert 0 < rec["l1"] < 1 and -1 <= rec["ssim"] < 1
        assert 0 <= rec["pose_iou"] <= 1 and 0 <= rec["shuffled_pose_iou"] <= 1
        assert rec["flicker"]["pairs"] == 1   # pairs (0,1) touches the key frame: only (1,2) is used
        assert rec["ran"]["unet_finetune_steps"] == 0 and rec["ran"]["vae_finetune_steps"] == 0
        assert rec["ran"]["unet_calls"] > 0 and rec["ran"]["sampled_size"] == [SIZE, SIZE]
        assert rec["vgg"].startswith("vgg: skipped — no VGG16/19 weights found")
    overall = row["overall"]
    # equal frame counts: the frame-weighted overall mean is the mean of the two videos
    assert overall["l1"] == pytest.approx(np.mean([r["l1"] for r in row["videos"].values()]))
    assert overall["fid"].startswith("fid: skipped") and overall["fvd"].startswith("fvd: skipped")
    assert "verdict" not in result
    md = (out / "metrics.md").read_text()
    assert "| model |" in md and "| model | video1 | 2 |" in md


def test_single_runs_the_real_pipeline(single, setup):
    """The saved frames are what encode → pose windows → sample → decode gives with the same seed,
    and the metrics are computed from them against the ground truth, key frame left out."""
    from dreampose.pipeline.conditioning import encode_image_condition
    from dreampose.data.dataset import load_frame, load_pose
    from dreampose.loaders.load import load_dreampose
    from dreampose.pipeline.poses import make_pose_windows
    from dreampose.pipeline.sampling import decode, sample
    from dreampose.settings import SamplingOptions

    out, result = single
    folder = os.path.join(setup["data"], "video1")
    gt = torch.stack([load_frame(os.path.join(folder, f"frame_{i}.png")) for i in range(FRAMES)])
    uv = torch.stack([load_pose(os.path.join(folder, f"frame_{i}_densepose.npy")) for i in range(FRAMES)])
    model = load_dreampose(clip=setup["clip"], dreampose=setup["full"])
    generator = torch.Generator().manual_seed(0)
    cond = encode_image_condition(model, gt[0], generator=generator)
    latents = sample(model, cond, make_pose_windows(uv, SIZE, SIZE),
                     SamplingOptions(width=SIZE, height=SIZE, steps=STEPS, frames_per_batch=2), generator=generator)
    frames = decode(model, latents, batch_size=2).permute(0, 3, 1, 2)
    saved = torch.stack([load_frame(str(out / "frames" / "model" / "video1" / f"frame_{i:04d}.png"))
                         for i in range(FRAMES)])
    assert torch.equal(saved, (frames.clamp(0, 1) * 255).round().to(torch.uint8))
    rec = result["rows"]["model"]["videos"]["video1"]
    gt01 = gt.float() / 255
    assert rec["l1"] == pytest.approx(M.l1(frames[1:], gt01[1:]).mean().item(), rel=1e-6)
    assert rec["ssim"] == pytest.approx(M.ssim(frames[1:], gt01[1:]).mean().item(), rel=1e-6)
    assert rec["l1"] != pytest.approx(M.l1(frames, gt01).mean().item(), rel=1e-6)   # the key frame is not in it
    assert M.l1(frames[1:], gt01[1:]).min() > 0.01   # not a copy of the ground truth


def test_contact_sheet(single):
    out, _ = single
    sheet = Image.open(out / "frames" / "model" / "video0_sheet.png")
    assert sheet.size == (SIZE * FRAMES, SIZE * 2)   # generated row over the ground truth row
    bottom = np.asarray(sheet)[SIZE:, SIZE:2 * SIZE]
    assert np.array_equal(bottom, np.asarray(Image.open(os.path.join(out.parent, "test", "video0", "frame_1.png"))))
    assert tuple(np.asarray(sheet)[0, 0]) == (255, 0, 0)   # the key frame's column is framed


# --------------------------------------------------------------------------------------------- ablation

def test_ablation_rows_and_what_ran(ablation, setup):
    out, result = ablation
    assert result["mode"] == "ablation"
    assert list(result["rows"]) == ["Ours_CLIP", "Ours_No-VAE-FT", "Ours_1-pose", "Ours_full"]
    expect = {"Ours_CLIP": ("clip_only", FT, FT, 5), "Ours_No-VAE-FT": ("full", FT, 0, 5),
              "Ours_1-pose": ("onepose", FT, FT, 1), "Ours_full": ("full", FT, FT, 5)}
    for name, (bundle, ft, vae, window) in expect.items():
        row = result["rows"][name]
        assert row["ran"]["bundle"] == setup[bundle] and row["ran"]["pose_window"] == window
        for rec in row["videos"].values():
            ran = rec["ran"]
            assert (ran["unet_finetune_steps"], ran["vae_finetune_steps"]) == (ft, vae), name
            assert ran["pose_offsets"] == ([0] * 5 if window == 1 else [-2, -1, 0, 1, 2])
            assert ran["pose_window_all_centre"] is (window == 1)
            assert ran["seed"] == 0 and ran["unet_calls"] > 0
    assert result["rows"]["Ours_CLIP"]["ran"]["adapter_vae_token_weight_max"] == 0.0
    drift = result["rows"]["Ours_CLIP"]["videos"]["video0"]["ran"]["adapter_vae_token_weight_max"]
    # its subject finetune holds the VAE tokens at zero too (FinetuneSettings.clip_only): it stays CLIP-only
    assert drift == 0.0 and not any(n.startswith("Ours_CLIP: the CLIP-only bundle") for n in result["notes"])
    # same UNet finetune, with and without the VAE decoder finetune: same poses, different pixels
    full, novae = result["rows"]["Ours_full"]["videos"]["video0"], result["rows"]["Ours_No-VAE-FT"]["videos"]["video0"]
    assert full["ran"]["unet_finetune_last_loss"] == novae["ran"]["unet_finetune_last_loss"]
    assert full["l1"] != novae["l1"]
    assert os.path.isfile(out / "frames" / "Ours_1-pose" / "video1_sheet.png")


def test_ablation_table_and_verdict(ablation):
    out, result = ablation
    verdict = result["verdict"]
    assert set(verdict) == {"l1", "ssim", "vgg", "lpips", "pose_iou", "flicker_ratio"}
    table = {name: row["overall"] for name, row in result["rows"].items()}
    assert verdict == E.ordering_verdict(table)
    assert verdict["vgg"]["holds"] is None and "not computed" in verdict["vgg"]["text"]
    l1s = {name: vals["l1"] for name, vals in table.items()}
    assert verdict["l1"]["holds"] == (l1s["Ours_full"] <= min(l1s.values()))
    md = (out / "metrics.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| Ours_")]
    assert [line.split("|")[1].strip() for line in lines[:4]] == list(E.ROWS)
    assert "| row | L1↓ | SSIM↑ | VGG↓ | LPIPS↓ | pose IoU↑ | shuffled-pose IoU | flicker ratio (→1) |" in md
    assert verdict["l1"]["text"] in md


def test_ordering_verdict_by_hand():
    table = {
        "Ours_CLIP": {"l1": 0.025, "ssim": 0.882, "vgg": 0.20, "lpips": "lpips: skipped — x", "flicker_ratio": 1.5},
        "Ours_1-pose": {"l1": 0.019, "ssim": 0.900, "vgg": 0.21, "lpips": "lpips: skipped — x", "flicker_ratio": 0.7},
        "Ours_full": {"l1": 0.018, "ssim": 0.900, "vgg": 0.207, "lpips": "lpips: skipped — x", "flicker_ratio": 1.2},
    }
    v = E.ordering_verdict(table, metrics=("l1", "ssim", "vgg", "lpips", "flicker_ratio", "pose_iou"))
    assert v["l1"]["holds"] is True and v["l1"]["tied_rows"] == [] and "best" in v["l1"]["text"]
    assert v["ssim"]["holds"] is True and v["ssim"]["tied_rows"] == ["Ours_1-pose"]
    assert v["vgg"]["holds"] is False and v["vgg"]["better_rows"] == ["Ours_CLIP"]
    assert "does NOT hold" in v["vgg"]["text"]
    assert v["lpips"]["holds"] is None and v["pose_iou"]["holds"] is None
    assert v["flicker_ratio"]["holds"] is True   # |1.2−1| < |0.7−1| < |1.5−1|
    alone = E.ordering_verdict({"Ours_full": {"l1": 0.1}}, metrics=("l1",))
    assert alone["l1"]["holds"] is None and "no other row" in alone["l1"]["text"]


# --------------------------------------------------------------------------------------------- errors

@pytest.fixture
def no_heavy_work(monkeypatch):
    """Errors must come before any model or metric network is loaded."""
    def refuse(*a, **k):
        raise AssertionError("heavy work started before the inputs were checked")
    monkeypatch.setattr(E, "load_model", refuse)
    monkeypatch.setattr(M, "load_feature_nets", refuse)


def expect_error(capsys, args, message):
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_input_errors(setup, tmp_path, capsys, no_heavy_work):
    s, out = setup, tmp_path / "out"
    expect_error(capsys, common(s, out, "--ablation", f"full={s['full']}", f"bogus={s['full']}"),
                 "unknown name 'bogus'")
    expect_error(capsys, common(s, out, "--ablation", f"clip={s['clip_only']}"), "needs full=FILE")
    expect_error(capsys, common(s, out, "--ablation", f"full={s['full']}", f"onepose={s['full']}"),
                 "given as the 1-pose model, but its metadata says pose_window=5")
    expect_error(capsys, common(s, out, "--dreampose", str(tmp_path / "missing.safetensors")),
                 "DreamPose bundle not found")
    expect_error(capsys, common(s, out, "--dreampose", s["full"], "--key-frame", 3), "--key-frame 3")
    no_clip = [a for a in common(s, out, "--dreampose", s["full"]) if a != s["clip"] and a != "--clip"]
    expect_error(capsys, no_clip, "--clip is required")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(capsys, ["--data", empty, "--clip", s["clip"], "--dreampose", s["full"], "--out", out],
                 "no prepared videos")
    bad = tmp_path / "bad"
    write_video(bad / "v", seed=0, uv_size=32)
    expect_error(capsys, ["--data", bad, "--clip", s["clip"], "--dreampose", s["full"], "--out", out],
                 "ground truth frames and UV of different sizes")
    odd = tmp_path / "odd"
    write_video(odd / "v", seed=0, size=40)
    expect_error(capsys, ["--data", odd, "--clip", s["clip"], "--dreampose", s["full"], "--out", out],
                 "give --width/--height")


# --------------------------------------------------------------------------------------------- feature metrics

class _FakeI3D(torch.nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return x.flatten(2).mean(-1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit.script
def test_feature_metrics_in_the_evaluation(setup):
    """VGG, LPIPS and FID computed through evaluate() with random-weight torchvision networks; FVD
    skipped with the reason (3-frame videos hold no 16-frame clip)."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models import vgg as tv_vgg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vgg = M.VGGFeatures("vgg16", tv_vgg.make_layers(tv_vgg.cfgs["D"])).eval()
        inception = tv.models.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    inception.fc = torch.nn.Identity()
    lins = [torch.rand(1, c, 1, 1, generator=torch.Generator().manual_seed(c)) for c in M.LPIPS_CHANNELS]
    nets = M.FeatureNets(vgg=vgg, lpips=M.LPIPS(vgg, lins), inception=inception.eval(),
                         i3d=torch.jit.script(_FakeI3D()))
    settings = E.EvalSettings(steps=1, frames_per_batch=3)
    result = E.evaluate(E.single_variant(setup["full"], settings), E.plan_videos(setup["data"], settings), settings,
                        clip=setup["clip"], nets=nets)
    row = result["rows"]["model"]
    for rec in row["videos"].values():
        assert rec["vgg"] > 0 and rec["lpips"] > 0
    assert row["overall"]["vgg"] == pytest.approx(np.mean([r["vgg"] for r in row["videos"].values()]))
    assert row["overall"]["fid"] > 0 and row["overall"]["fid_frames"] == 4
    assert row["overall"]["fvd"].startswith("fvd: skipped — 0 clip(s) of 16 consecutive evaluated frames")
    assert any("not the TF-FID network" in n for n in result["notes"])
    md = E.markdown_report(result)
    assert md.splitlines()[4].endswith("| FID↓ |")   # FVD: no column, its reason in the notes
    assert "- fvd: skipped — 0 clip(s)" in md


def test_drift_is_skipped_with_the_reason_off_the_synthetic_world(single):
    out, result = single
    rec = result["rows"]["model"]["videos"]["video0"]
    assert rec["drift"] == "drift: skipped — " + E.NO_SURFACE
    assert result["rows"]["model"]["overall"]["key_drift"].startswith("key_drift: skipped")
    assert "drift↓" not in (out / "metrics.md").read_text()


def test_eval_on_the_synthetic_world_reports_appearance_drift_with_consistency_options(setup, tmp_path):
    from dreampose.data.dataset import load_frame
    from dreampose.data.world import rendered_truth, silhouette
    from dreampose.data.dataset import read_video_folder

    data = tmp_path / "world"
    assert cli.main(["synth", "--out", str(data), "--split", "test", "--videos", "1", "--frames", "4", "--height",
                     "64", "--width", "64", "--quiet"]) == 0
    out = tmp_path / "ev"
    rc = run("--data", data / "test", "--clip", setup["clip"], "--out", out, "--steps", STEPS, "--frames-per-batch", 2,
             "--no-discover", "--quiet", "--device", "cpu", "--dreampose", setup["full"], "--save-frames",
             "--reference-attention", 1, "--cross-frame-attention", 0.5, "--uv-smoothing", 1)
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["settings"]["reference_attention"] == 1.0 and result["settings"]["uv_smoothing"] == 1
    rec = result["rows"]["model"]["videos"]["world_0000"]
    ran = rec["ran"]
    # 4 frames in chunks of 2, 3 branches, one call per timestep (PNDM's 2 steps are 3 timesteps); one more row
    # per branch for the reference in both chunks and for the anchor in the second
    from dreampose.pipeline.sampling import make_scheduler
    sched = make_scheduler("pndm")
    sched.set_timesteps(STEPS)
    calls = len(sched.timesteps)
    assert ran["image_evaluations"] == calls * 3 * (4 + 2 * 1 + 1 * 1)
    folder = str(data / "test" / "world_0000")
    parts = rendered_truth(read_video_folder(folder).info()).parts
    gt = torch.stack([load_frame(os.path.join(folder, f"frame_{i}.png")) for i in range(4)]).float() / 255
    uv = torch.stack([torch.from_numpy(np.load(os.path.join(folder, f"frame_{i}_densepose.npy"))) for i in range(4)])
    saved = torch.stack([load_frame(str(out / "frames" / "model" / "world_0000" / f"frame_{i:04d}.png"))
                         for i in range(4)]).float() / 255
    want = M.appearance_drift(saved, gt, parts, uv, key_frame=gt[0], key_parts=parts[0], key_uv=uv[0], pairs=[1, 2],
                              key_pairs=[1, 2, 3])
    # the saved frames are the generated ones rounded to 8 bits
    assert rec["drift"] == pytest.approx(want["consecutive"]["generated"], abs=2e-3)
    assert rec["key_drift"] == pytest.approx(want["key"]["generated"], abs=2e-3)
    assert rec["appearance_drift"]["consecutive"]["pairs"] == 2
    overall = result["rows"]["model"]["overall"]
    assert overall["drift"] == pytest.approx(rec["drift"]) and overall["drift_floor"] == pytest.approx(
        want["consecutive"]["ground_truth"], abs=1e-6)
    assert "drift↓" in (out / "metrics.md").read_text()
    # on the generated person's pixels only (the silhouette of the saved frames, rounded as above)
    person = M.appearance_drift(saved, gt, parts, uv, key_frame=gt[0], key_parts=parts[0], key_uv=uv[0], pairs=[1, 2],
                                key_pairs=[1, 2, 3], masks=silhouette(saved))
    assert rec["texture_drift"] == pytest.approx(person["consecutive"]["generated"], abs=2e-3)
    assert rec["key_texture_drift"] == pytest.approx(person["key"]["generated"], abs=2e-3)
    assert overall["texture_drift_floor"] == pytest.approx(person["consecutive"]["ground_truth"], abs=2e-3)
    assert "texture drift↓" in (out / "metrics.md").read_text()
