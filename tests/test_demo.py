"""The shipped demo model and what builds it (dreampose/demo_model.py), self-contained bundles, and
the demo command: it must animate an unseen synthetic person so that the frames follow the poses."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dreampose.demo import build
from dreampose.demo import model as dm
from dreampose.files.weights import read_metadata, read_state_dict
from dreampose.pipeline.conditioning import VAE_SCALE
from dreampose.errors import DreamPoseError
from dreampose.loaders.load import bundle_has_clip, load_dreampose, load_dreampose_file, save_bundle
from dreampose.demo.tiny import tiny_dreampose, tiny_vae
from dreampose.data.world import body_mask, random_outfit, silhouette, world_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ self-contained bundles

def test_bundle_can_carry_its_clip_and_be_stored_in_fp16(tmp_path):
    model = tiny_dreampose()
    path = str(tmp_path / "all_in_one.safetensors")
    save_bundle(path, model.unet, model.adapter, model.vae, clip=model.clip, dtype=torch.float16,
                convention="standard")
    assert bundle_has_clip(path)
    loaded = load_dreampose(dreampose=path)          # no separate CLIP needed
    for ours, theirs in ((model.clip, loaded.clip), (model.unet, loaded.unet), (model.vae, loaded.vae)):
        expected, got = ours.state_dict(), theirs.state_dict()
        assert expected.keys() == got.keys()
        for k in expected:
            assert got[k].dtype == (torch.float16 if expected[k].is_floating_point() else expected[k].dtype)
            assert torch.equal(got[k], expected[k].to(got[k].dtype)), k
    assert loaded.convention == "standard"


def test_a_bundle_without_clip_still_needs_one(tmp_path):
    model = tiny_dreampose()
    path = str(tmp_path / "no_clip.safetensors")
    save_bundle(path, model.unet, model.adapter, model.vae, convention="standard")
    assert not bundle_has_clip(path)
    with pytest.raises(DreamPoseError, match="no CLIP vision model given"):
        load_dreampose(dreampose=path)


# ------------------------------------------------------------------------------------ miniature SD

def test_latent_calibration_is_an_exact_reparametrisation():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(6, 3, 64, 64, generator=g) * 255).to(torch.uint8)
    x = frames.float() / 127.5 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        decoded_before = vae.decode(before.mean).sample
    k = build.calibrate_latent_scale(vae, frames, target_std=1.0)
    with torch.no_grad():
        after = vae.encode(x).latent_dist
        decoded_after = vae.decode(after.mean).sample
    assert torch.allclose(after.mean, before.mean * k, rtol=1e-5, atol=1e-6)
    assert torch.allclose(after.std, before.std * k, rtol=1e-4)
    assert torch.allclose(decoded_after, decoded_before, atol=1e-5)          # same pictures from the same frames
    assert (after.mean * VAE_SCALE).std().item() == pytest.approx(1.0, rel=1e-4)


def test_autoencoder_pretraining_learns_to_reconstruct():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(1)
    frames = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    frames[:, 0, 16:48, 16:48] = (torch.rand(4, 1, 1, generator=g) * 255).to(torch.uint8)   # coloured squares
    losses = build.pretrain_autoencoder(vae, frames, steps=40, batch=4, crop=64, lr=3e-3, seed=0)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert not any(p.requires_grad for p in vae.parameters())   # handed back frozen, in eval mode
    assert not vae.training


def test_pretraining_refuses_float_frames():
    with pytest.raises(DreamPoseError, match="uint8"):
        build.pretrain_autoencoder(tiny_vae(), torch.rand(2, 3, 64, 64), steps=1)


def test_border_noise_touches_only_the_outer_latent_rows_and_columns():
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    out = build.perturb_border(z, 2, 3.0, torch.Generator().manual_seed(1))
    inner = torch.zeros(8, 6, dtype=torch.bool)
    inner[2:-2, 2:-2] = True
    assert torch.equal(out[..., inner], z[..., inner])
    changed = (out - z).abs() > 0
    assert changed[..., ~inner].all()
    assert ((out - z)[..., ~inner].std() * VAE_SCALE).item() == pytest.approx(3.0, rel=0.2)   # SD-scaled units
    assert torch.equal(build.border_mask(8, 6, 2), ~inner)
    assert build.perturb_border(z, 0, 3.0, torch.Generator()) is z
    assert build.perturb_border(z, 2, 0.0, torch.Generator()) is z


def test_decoder_phase_trains_the_decoder_only_and_keeps_the_rest_of_the_bundle(tmp_path, monkeypatch):
    model = tiny_dreampose()
    bundle = model.save(str(tmp_path / "trained.safetensors"), include_vae=True, subject="stage 1")
    frames = torch.zeros(4, 3, 64, 48, dtype=torch.uint8)
    frames[:, 1, 16:48, 8:40] = 200
    monkeypatch.setattr(build, "_load_frames", lambda data, h, w, limit: frames)
    out = str(tmp_path / "decoder.safetensors")
    calls = []
    record = build.decoder_phase(bundle, ["unused"], out, steps=3, batch=2, lr=1e-3, border=1, border_noise=2.0,
                                 progress=lambda step, total, loss: calls.append(step),
                                 meta={"training_commands": "the recipe"})
    assert calls == [1, 2, 3] and record["steps"] == 3 and record["border_noise"] == 2.0 and record["frames"] == 4
    before, after = load_dreampose_file(bundle)[2].state_dict(), load_dreampose_file(out)[2].state_dict()
    for k in before:
        if k.startswith(("decoder.", "post_quant_conv.")):
            continue
        assert torch.equal(before[k], after[k]), k                   # encoder and quant_conv bit-identical
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    assert not torch.equal(before["post_quant_conv.weight"], after["post_quant_conv.weight"])
    old, new = read_state_dict(bundle), read_state_dict(out)
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith(("vae.decoder.", "vae.post_quant_conv.")))
    meta = read_metadata(out)
    assert json.loads(meta.pop("decoder_pretraining"))["border"] == 1
    assert meta.pop("training_commands") == "the recipe" and "training_commands" not in read_metadata(bundle)
    assert meta == read_metadata(bundle)


# ------------------------------------------------------------------------------------ demo scene

def test_demo_scene_is_an_unseen_test_split_person():
    scene = dm.demo_scene(frames=6, subject=2, motion="walk", height=128, width=64)
    assert scene["key_uv"].shape == (2, 128, 64) and torch.equal(body_mask(scene["key_uv"]),
                                                                  silhouette(scene["key_frame"].float() / 255))
    outfit_seed, _ = world_seeds(dm.DEMO_WORLD_SEED, "test", 2)
    assert str(outfit_seed) in scene["subject"]
    assert scene["key_frame"].dtype == torch.uint8 and scene["key_frame"].shape == (3, 128, 64)
    assert scene["uv"].shape == (6, 2, 128, 64) and scene["truth"].shape == (6, 3, 128, 64)
    assert torch.equal(silhouette(scene["truth"]), body_mask(scene["uv"]))   # exact ground truth
    # the key frame shows the same outfit: its colours come from that outfit, not another subject's
    other = dm.demo_scene(frames=6, subject=3, motion="walk", height=128, width=64)
    assert not torch.equal(scene["key_frame"], other["key_frame"])
    assert random_outfit(outfit_seed) == random_outfit(outfit_seed)
    with pytest.raises(DreamPoseError, match="unknown motion"):
        dm.demo_scene(frames=2, motion="moonwalk")


# ------------------------------------------------------------------------------------ the shipped model

def test_shipped_demo_file_is_small_self_contained_and_records_its_recipe():
    assert os.path.getsize(dm.DEMO_FILE) < 12 * 2 ** 20
    meta = read_metadata(dm.DEMO_FILE)
    assert bundle_has_clip(dm.DEMO_FILE) and "vae_config" in meta
    with open(os.path.join(ROOT, "scripts", "train_demo_model.sh")) as f:
        assert meta["training_commands"] == f.read()      # the script in the repo is what trained the file
    assert (int(meta["demo_height"]), int(meta["demo_width"])) == (dm.DEMO_HEIGHT, dm.DEMO_WIDTH)
    assert meta["convention"] == "standard"


def test_demo_command_animates_and_follows_the_driving_pose(tmp_path):
    from dreampose.cli.main import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--frames", "8", "--quiet", "--threads", "2"]) == 0
    for name in ("frame_0000.png", "frame_0007.png", "dreampose.mp4", "dreampose.gif", "contact_sheet.png",
                 "key_frame.png", "poses/frame_7_densepose.npy"):
        assert (out / name).is_file(), name
    info = json.loads((out / "dreampose_run.json").read_text())
    assert info["timings"]["finetune_s"] > 0 and info["options"]["finetune_steps"] == dm.DEMO_FINETUNE_STEPS
    align = info["pose_alignment"]
    assert len(align["per_frame"]) == 8
    # the frames follow the poses: far better overlap with their own pose than with the poses shuffled
    assert align["iou"] > 0.6, align
    assert align["iou"] > align["shuffled_iou"] + 0.15, align
