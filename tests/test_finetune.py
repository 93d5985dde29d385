"""Subject finetuning (paper §4.3) on tiny models: it learns, touches only what it should, crops photo
and pose alike, saves/reloads/reuses exactly, and survives ComfyUI's inference mode.

Targets train at 64×64 (latent 8×8) to keep every run well under a second or two on 2 CPU cores;
conditioning still runs at 640×512 as the adapter requires. Learning rates are high (1e-3..1e-2)
because the tiny random networks need visible progress in a few dozen steps.
"""
from __future__ import annotations

import os

import pytest
import torch

from dreampose.cli import main as cli
from dreampose.training import finetune as ft
from dreampose.training.augment import CropBox, augment_pair, sample_crop_box
from dreampose.errors import DreamPoseError
from dreampose.loaders.load import load_dreampose
from dreampose.loaders.subject_file import clone_module, lora_delta_of, weights_fingerprint
from dreampose.data.synthetic import synthetic_key_frame, synthetic_uv_sequence
from dreampose.demo.tiny import tiny_dreampose

from conftest import assert_same_tensors

SIZE = dict(height=64, width=64)


def fast(**kw) -> ft.FinetuneSettings:
    return ft.FinetuneSettings(**{"steps": 4, "lr": 1e-3, **SIZE, **kw})


def fast_vae(**kw) -> ft.FinetuneSettings:
    return ft.vae_settings(**{"steps": 4, "lr": 1e-3, **SIZE, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: on a shared 2-core box, OpenMP threads spinning against other jobs made a
    40-step run take 30–60 s instead of 1 s (docs/benchmarks.md, "OpenMP threads")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """One subject photo [1,3,160,128] in 0..1 (not the training or the conditioning size)."""
    return synthetic_key_frame(160, 128).float().unsqueeze(0) / 255


@pytest.fixture(scope="module")
def pose() -> torch.Tensor:
    return synthetic_uv_sequence(1, 160, 128)


@pytest.fixture()
def base():
    """A fresh tiny model per test (the same weights as conftest's ``tiny_dreampose_file``)."""
    return tiny_dreampose(seed=0)


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 14, 8, 8, generator=g)
    hidden = torch.randn(2, 50, 32, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 700]), encoder_hidden_states=hidden).sample


def adapter_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        return model.adapter(torch.randn(1, 50, 32, generator=g), torch.randn(1, 4, 80, 64, generator=g))


# ----------------------------------------------------------------------------------------- learning, scope

def test_subject_finetune_learns_and_changes_only_unet_and_adapter(base, photo, pose):
    before = {name: snapshot(getattr(base, name)) for name in ("unet", "adapter", "vae", "clip")}
    settings = fast(steps=40)
    eval_before = ft.subject_loss(base, photo, pose, settings)
    losses = []
    new = ft.finetune_subject(base, photo, pose, settings, callback=lambda s, n, loss: losses.append((s, n, loss)))

    assert [s for s, _, _ in losses] == list(range(1, 41)) and {n for _, n, _ in losses} == {40}
    first = sum(loss for *_, loss in losses[:8]) / 8
    last = sum(loss for *_, loss in losses[-8:]) / 8
    eval_after = ft.subject_loss(new, photo, pose, settings)
    assert last < 0.8 * first, (first, last)
    assert eval_after < 0.6 * eval_before, (eval_before, eval_after)
    # the input model is untouched; the new one shares the frozen networks and owns new UNet/adapter
    for name, state in before.items():
        assert_same_tensors(snapshot(getattr(base, name)), state)
    assert new.vae is base.vae and new.clip is base.clip
    assert new.unet is not base.unet and new.adapter is not base.adapter
    assert changed(snapshot(new.unet), before["unet"]) and changed(snapshot(new.adapter), before["adapter"])
    assert not any(p.requires_grad for p in new.unet.parameters()) and not new.unet.training
    assert next(new.unet.parameters()).dtype == torch.float32
    assert new.info["finetune"]["mode"] == "full" and new.convention == base.convention


def test_clip_only_finetune_keeps_the_vae_tokens_at_exactly_zero(base, photo, pose):
    """The paper's Ours_CLIP row: a CLIP-only model must not learn a VAE path during its subject finetune."""
    tokens = base.adapter.clip_tokens
    assert base.adapter.linear1.weight[:, tokens:].abs().max() > 0     # the tiny model starts with a VAE path
    clip_only = ft.finetune_subject(base, photo, pose, fast(steps=5, clip_only=True))
    both = ft.finetune_subject(base, photo, pose, fast(steps=5))
    w = clip_only.adapter.linear1.weight
    assert torch.equal(w[:, tokens:], torch.zeros_like(w[:, tokens:]))
    assert not torch.equal(w[:, :tokens], base.adapter.linear1.weight[:, :tokens])   # the CLIP side still learns
    assert both.adapter.linear1.weight[:, tokens:].abs().max() > 0
    assert ft.subject_cache_key is not None and "clip_only" not in fast().cache_fields()   # old keys unchanged
    assert fast(clip_only=True).cache_fields()["clip_only"] is True


def test_vae_decoder_finetune_learns_and_changes_the_decoder_only(base, photo):
    before = {name: snapshot(getattr(base, name)) for name in ("unet", "adapter", "vae", "clip")}
    settings = fast_vae(steps=30)
    loss_before = ft.vae_reconstruction_loss(base, photo, settings)
    new = ft.finetune_vae_decoder(base, photo, settings)
    assert ft.vae_reconstruction_loss(new, photo, settings) < 0.6 * loss_before

    for name, state in before.items():
        assert_same_tensors(snapshot(getattr(base, name)), state)
    assert new.unet is base.unet and new.adapter is base.adapter and new.clip is base.clip
    diff = changed(snapshot(new.vae), before["vae"])
    assert diff and all(k.startswith("decoder.") for k in diff)
    frozen = [k for k in before["vae"] if k.startswith(("encoder.", "quant_conv.", "post_quant_conv."))]
    assert frozen and not diff & set(frozen)


def test_decoder_blend_keeps_that_share_of_the_weight_change(base, photo):
    """decoder_blend b: the decoder equals base + b·(the b = 1 run's decoder − base), the rest of the VAE frozen."""
    full = ft.finetune_vae_decoder(base, photo, fast_vae(steps=3, decoder_loss="l1"))
    half = ft.finetune_vae_decoder(base, photo, fast_vae(steps=3, decoder_loss="l1", decoder_blend=0.5))
    start, trained, blended = snapshot(base.vae), snapshot(full.vae), snapshot(half.vae)
    moved = changed(trained, start)
    assert moved and all(k.startswith("decoder.") for k in moved)
    for name in start:
        expected = start[name] + 0.5 * (trained[name] - start[name])
        torch.testing.assert_close(blended[name], expected, rtol=0, atol=1e-6)
    assert half.info["vae_finetune"]["settings"]["decoder_blend"] == 0.5


def test_decoder_l1_loss_is_the_mean_absolute_error_of_the_reconstruction(base):
    """_vae_loss with "l1" and "mse": hand computed from the same seeded posterior sample and decode."""
    vae = base.vae
    x = torch.rand(1, 3, 64, 64) * 2.4 - 1.2          # out of −1..1 on purpose: both sides are clamped
    got = {loss: float(ft._vae_loss(vae, x, torch.Generator().manual_seed(5), "cpu", "fp32", loss))
           for loss in ("l1", "mse")}
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
        recon = vae.decode(dist.mean + dist.std * noise).sample.clamp(-1, 1)
    err = recon - x.clamp(-1, 1)
    assert got["l1"] == pytest.approx(float(err.abs().mean()), rel=1e-5)
    assert got["mse"] == pytest.approx(float((err ** 2).mean()), rel=1e-5)
    assert got["l1"] != pytest.approx(got["mse"])


def test_decoder_loss_and_blend_are_checked_and_keyed_only_off_default():
    for bad, match in (({"decoder_loss": "l2"}, r"decoder_loss must be one of \('mse', 'l1'\) \(got 'l2'\)"),
                       ({"decoder_blend": 0}, r"decoder_blend must be a number in \(0, 1\] \(got 0;"),
                       ({"decoder_blend": 1.5}, r"decoder_blend must be a number in \(0, 1\] \(got 1.5;"),
                       ({"decoder_blend": True}, r"decoder_blend must be a number in \(0, 1\] \(got True;")):
        with pytest.raises(DreamPoseError, match=match):
            ft.check_settings(fast_vae(**bad), "vae")
    default = fast_vae().cache_fields()
    assert "decoder_loss" not in default and "decoder_blend" not in default     # keys saved before stay valid
    assert fast_vae(decoder_loss="l1").cache_fields()["decoder_loss"] == "l1"
    assert fast_vae(decoder_blend=0.6).cache_fields()["decoder_blend"] == 0.6


# ----------------------------------------------------------------------------------------- augmentation

def coordinate_pair(height=64, width=64):
    """A photo whose R/G channels are the x/y coordinate and a pose whose U/V are the same maps."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([x, y, torch.full_like(x, 0.5)])
    pose = torch.stack([x, y])
    return image, pose


def test_image_and_pose_are_cropped_with_the_same_box():
    image, pose = coordinate_pair()
    g = torch.Generator().manual_seed(3)
    boxes = set()
    for _ in range(20):
        img, uv, aug = augment_pair(image, pose, g, crop=True, crop_prob=1.0, min_scale=0.6, flip=True)
        boxes.add(aug.box)
        assert torch.equal(img[:2], uv)          # one box (and one flip) for both tensors
        # the box is recoverable from either tensor: the coordinate maps span its columns and rows
        xs = uv[0] * 63
        assert abs(float(xs.amin()) - aug.box.left) < 1.0
        assert abs(float(xs.amax()) - (aug.box.left + aug.box.width - 1)) < 1.0
        assert bool(xs[0, 0] > xs[0, -1]) == aug.flipped
        ys = img[1] * 63
        assert abs(float(ys.amin()) - aug.box.top) < 1.0
        assert abs(float(ys.amax()) - (aug.box.top + aug.box.height - 1)) < 1.0
        assert aug.box.height * 64 == pytest.approx(aug.box.width * 64, abs=64)   # aspect kept
    assert len(boxes) > 10 and CropBox.full(64, 64) not in boxes


def test_crop_box_stays_inside_and_respects_the_scale():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        box = sample_crop_box(640, 512, 0.92, g)
        assert 0 <= box.top and box.top + box.height <= 640 and 0 <= box.left and box.left + box.width <= 512
        assert box.height >= round(0.92 * 640) - 1 and abs(box.width - box.height * 512 / 640) <= 1


def test_training_batches_crop_target_and_pose_together():
    """Through the trainer's own batch builder: the target photo and the pose channels (after the
    sampler's normalisation and nearest downsampling) still hold the same coordinates."""
    image, pose = coordinate_pair()
    data = ft._SubjectData([image], [pose], *([None] * 6))
    g = torch.Generator().manual_seed(5)
    settings = fast(crop_prob=1.0, crop_min_scale=0.6, flip=True)
    for _ in range(5):
        batch = ft._subject_batch(data, [0], settings, g)
        target01 = (batch.target + 1) / 2
        target_lat = torch.nn.functional.interpolate(target01[:, :2], (8, 8), mode="nearest")
        assert batch.pose.shape == (1, 10, 8, 8)
        for slot in range(5):   # the same pose in all five window slots
            uv = batch.pose[:, 2 * slot:2 * slot + 2] * 0.5 + 0.5
            torch.testing.assert_close(uv, target_lat, atol=1e-6, rtol=0)
        assert not torch.allclose(target01[0, :2], image[:2])


# ----------------------------------------------------------------------------------------- LoRA

def test_lora_delta_saved_and_applied_equals_the_trained_model(base, photo, pose, tmp_path, tiny_dreampose_file,
                                                               tiny_clip_folder):
    settings = fast(steps=6, lr=1e-2, lora_rank=4)
    new = ft.finetune_subject(base, photo, pose, settings)
    delta = lora_delta_of(new)
    assert delta is not None and delta.rank == 4 and delta.scale == 1.0
    assert any(float(b.abs().max()) > 0 for _, b in delta.factors.values())
    key = ft.subject_cache_key(base, photo, pose, settings, "subject")
    path = ft.save_subject(new, str(tmp_path / "lora.safetensors"), kind="subject", settings=settings,
                           cache_key=key, base="tiny-subject.safetensors", lora=True)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert not [k for k in keys if k.startswith("unet.")]
    assert {k.split(".")[0] for k in keys} == {"unet_lora", "adapter"}
    assert meta["mode"] == "lora" and meta["finetuned"] == "unet+adapter" and meta["cache_key"] == key
    assert meta["base_model"] == "tiny-subject.safetensors" and meta["lora_rank"] == "4"
    assert os.path.getsize(path) < 0.2 * sum(v.numel() * 4 for v in new.unet.state_dict().values())

    applied = ft.apply_subject(tiny_dreampose(seed=0), path)
    assert torch.equal(unet_out(applied), unet_out(new)) and torch.equal(adapter_out(applied), adapter_out(new))
    loaded = load_dreampose(clip=tiny_clip_folder, dreampose=tiny_dreampose_file, subject=path)
    assert torch.equal(unet_out(loaded), unet_out(new)) and torch.equal(adapter_out(loaded), adapter_out(new))
    with pytest.raises(DreamPoseError, match="other DreamPose weights"):
        ft.apply_subject(tiny_dreampose(seed=1), path)
    with pytest.raises(DreamPoseError, match="LoRA subject finetune, not a whole"):
        load_dreampose(clip=tiny_clip_folder, dreampose=path)


def test_lora_merge_equals_peft_forward(base):
    """Our merge W + (α/r)·B·A is what peft's unmerged LoRA layers compute."""
    pytest.importorskip("peft")
    settings = fast(lora_rank=3, lora_alpha=6.0)
    live = clone_module(base.unet)
    ft._inject_lora(live, settings)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in live.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    delta = ft._extract_lora(live, settings, weights_fingerprint(base.unet), "")
    assert delta.scale == 2.0 and delta.factors
    merged = ft.merge_lora(clone_module(base.unet), delta)
    torch.testing.assert_close(unet_out(base.shallow_copy(unet=merged)), unet_out(base.shallow_copy(unet=live)),
                               atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------- files, cache, cancel

def test_cancelled_run_leaves_no_file_and_no_temp_file(base, photo, pose, tmp_path):
    seen = []

    def cancel(step, total, loss):
        seen.append(step)
        if step == 3:
            raise KeyboardInterrupt("cancelled")

    out = tmp_path / "subjects"
    out.mkdir()
    for kind in ("subject", "vae"):
        with pytest.raises(KeyboardInterrupt):
            ft.finetune_to_file(kind, base, photo, pose, fast(steps=10) if kind == "subject" else fast_vae(steps=10),
                                str(out / f"{kind}.safetensors"), callback=cancel)
    assert seen == [1, 2, 3, 1, 2, 3]
    assert os.listdir(out) == []


def test_identical_request_reuses_the_saved_file_and_changes_miss(base, photo, pose, tmp_path):
    settings = fast(steps=3)
    path = str(tmp_path / "alice.safetensors")
    steps = []
    first = ft.finetune_to_file("subject", base, photo, pose, settings, path, callback=lambda s, n, _: steps.append(s))
    assert not first.cached and first.steps_trained == 3 and steps == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["alice.safetensors"]
    assert ft.find_cached_subject(str(tmp_path), first.cache_key) == path

    steps.clear()
    again = ft.finetune_to_file("subject", base, photo, pose, settings, path, callback=lambda s, n, _: steps.append(s))
    assert again.cached and again.steps_trained == 0 and steps == [] and again.cache_key == first.cache_key
    assert torch.equal(unet_out(again.model), unet_out(first.model))
    # the lookup as a node does it: by key, in a folder
    assert ft.find_cached_subject(str(tmp_path), ft.subject_cache_key(base, photo.clone(), pose.clone(), settings,
                                                                      "subject")) == path

    def key(**changes):
        p = changes.pop("photo", photo)
        u = changes.pop("pose", pose)
        model = changes.pop("model", base)
        return ft.subject_cache_key(model, p, u, fast(steps=3, **changes), "subject")

    other_photo = photo.clone()
    other_photo[0, 0, 5, 5] = 1 - other_photo[0, 0, 5, 5]
    other_pose = pose.clone()
    other_pose[0, 1, 80, 64] += 0.01
    misses = [key(lr=2e-3), key(seed=1), key(crop=False), key(lora_rank=2), key(photo=other_photo),
              key(pose=other_pose), key(model=tiny_dreampose(seed=1)),
              ft.subject_cache_key(base, photo, pose, settings, "vae")]
    assert len(set(misses)) == len(misses) and first.cache_key not in misses
    assert all(ft.find_cached_subject(str(tmp_path), k) is None for k in misses)
    assert key(gradient_checkpointing=True) == first.cache_key   # same arithmetic, so the same finetune
    forced = ft.finetune_to_file("subject", base, photo, pose, settings, path, force=True)
    assert not forced.cached and forced.steps_trained == 3


def test_saved_subjects_reload_to_identical_outputs(base, photo, pose, tmp_path, tiny_dreampose_file,
                                                    tiny_clip_folder):
    settings = fast(steps=3)
    new = ft.finetune_subject(base, photo, pose, settings)
    full = ft.save_subject(new, str(tmp_path / "full.safetensors"), kind="subject", settings=settings,
                           cache_key="k1", base=base, lora=False)
    vae_new = ft.finetune_vae_decoder(new, photo, fast_vae(steps=3))
    vae_path = ft.save_subject(vae_new, str(tmp_path / "vae.safetensors"), kind="vae", settings=fast_vae(steps=3),
                               cache_key="k2", base=base, lora=False)
    assert sorted(os.listdir(tmp_path)) == ["full.safetensors", "vae.safetensors"]

    loaded = load_dreampose(clip=tiny_clip_folder, dreampose=tiny_dreampose_file, subject=[full, vae_path])
    assert_same_tensors(snapshot(loaded.unet), snapshot(new.unet))
    assert_same_tensors(snapshot(loaded.adapter), snapshot(new.adapter))
    assert_same_tensors(snapshot(loaded.vae), snapshot(vae_new.vae))
    applied = ft.apply_subject(ft.apply_subject(tiny_dreampose(seed=0), full), vae_path)
    assert torch.equal(unet_out(applied), unet_out(new))
    assert_same_tensors(snapshot(applied.vae), snapshot(vae_new.vae))
    # a VAE decoder subject is a delta, not a DreamPose file by itself
    with pytest.raises(DreamPoseError, match="VAE decoder finetune, not a whole"):
        load_dreampose(clip=tiny_clip_folder, dreampose=vae_path)
    # a subject finetuned in one convention is refused on a model running in the other
    with pytest.raises(DreamPoseError, match="convention"):
        ft.apply_subject(tiny_dreampose(seed=0, convention="official"), full)


# ----------------------------------------------------------------------------------------- ComfyUI conditions

def test_finetunes_run_inside_inference_mode_and_in_bf16(photo, pose, tmp_path):
    with torch.inference_mode():
        model = tiny_dreampose(seed=0)                         # weights made under inference mode, as in a node
        photos, uv = photo.clone(), pose.clone()               # inference tensors too
        assert next(model.unet.parameters()).is_inference() and photos.is_inference()
        new = ft.finetune_subject(model, photos, uv, fast(steps=3, precision="bf16"))
        lora = ft.finetune_subject(model, photos, uv, fast(steps=3, precision="bf16", lora_rank=2))
        vae_new = ft.finetune_vae_decoder(new, photos, fast_vae(steps=3, precision="bf16"))
        key = ft.subject_cache_key(model, photos, uv, fast(steps=3, precision="bf16"), "subject")
        path = ft.save_subject(new, str(tmp_path / "s.safetensors"), kind="subject",
                               settings=fast(steps=3, precision="bf16"), cache_key=key, base=model)
        again = ft.apply_subject(model, path)
        assert torch.equal(unet_out(again), unet_out(new))
    for out in (new, lora):
        assert changed(snapshot(out.unet), snapshot(model.unet)) or changed(snapshot(out.adapter),
                                                                            snapshot(model.adapter))
        assert torch.isfinite(unet_out(out)).all()
    assert changed(snapshot(vae_new.vae), snapshot(model.vae))
    assert not next(new.unet.parameters()).is_inference()


def test_same_seed_same_weights_and_checkpointing_changes_nothing(photo, pose):
    """Seeded end to end, with crops, flips and per-sample dropout in the official convention (whose
    null image latent is transposed)."""
    base = tiny_dreampose(seed=0, convention="official")
    two = torch.cat([photo, photo.flip(-1)])
    uv = torch.cat([pose, pose.flip(-1)])
    settings = fast(steps=4, batch_size=2, flip=True, crop_prob=1.0, dropout=0.9)
    a = ft.finetune_subject(base, two, uv, settings)
    b = ft.finetune_subject(base, two, uv, settings)
    c = ft.finetune_subject(base, two, uv, fast(steps=4, batch_size=2, flip=True, crop_prob=1.0, dropout=0.9,
                                                gradient_checkpointing=True))
    d = ft.finetune_subject(base, two, uv, fast(steps=4, batch_size=2, flip=True, crop_prob=1.0, dropout=0.9, seed=1))
    for x in (b, c):
        assert_same_tensors(snapshot(x.unet), snapshot(a.unet))
        assert_same_tensors(snapshot(x.adapter), snapshot(a.adapter))
    assert changed(snapshot(d.unet), snapshot(a.unet))
    va = ft.finetune_vae_decoder(base, two, fast_vae(steps=3, flip=True))
    vb = ft.finetune_vae_decoder(base, two, fast_vae(steps=3, flip=True))
    assert_same_tensors(snapshot(va.vae), snapshot(vb.vae))


# ----------------------------------------------------------------------------------------- errors

def test_bad_inputs_and_settings_are_clear_errors(base, photo, pose):
    with pytest.raises(DreamPoseError, match="1 subject photo.*2 DensePose"):
        ft.finetune_subject(base, photo, torch.cat([pose, pose]), fast())
    with pytest.raises(DreamPoseError, match="channels last"):
        ft.finetune_subject(base, photo.movedim(1, -1), pose, fast())
    with pytest.raises(DreamPoseError, match="expected 0..1"):
        ft.finetune_subject(base, photo * 2 - 1, pose, fast())
    with pytest.raises(DreamPoseError, match="precision"):
        ft.finetune_subject(base, photo, pose, fast(precision="fp8"))
    with pytest.raises(DreamPoseError, match="multiple of 64"):
        ft.finetune_subject(base, photo, pose, fast(height=100))
    with pytest.raises(DreamPoseError, match="always full"):
        ft.finetune_vae_decoder(base, photo, fast_vae(lora_rank=4))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(DreamPoseError, match="bitsandbytes"):
            ft.finetune_subject(base, photo, pose, fast(optimizer="adamw8bit"))
    full = ft.finetune_subject(base, photo, pose, fast(steps=1))
    with pytest.raises(DreamPoseError, match="no LoRA delta"):
        ft.save_subject(full, "/nonexistent/x.safetensors", kind="subject", settings=fast(steps=1), cache_key="k",
                        lora=True)


# ----------------------------------------------------------------------------------------- command line

def test_cli_finetune_subject_reuses_and_animate_applies_it(tmp_path, tiny_dreampose_file, tiny_clip_folder, capsys):
    import numpy as np
    from PIL import Image

    images = tmp_path / "photos"
    poses = tmp_path / "poses"
    images.mkdir()
    poses.mkdir()
    for i in range(2):
        Image.fromarray(synthetic_key_frame(100, 80).permute(1, 2, 0).numpy()).save(images / f"frame_{i}.png")
        np.save(poses / f"frame_{i}_densepose.npy", synthetic_uv_sequence(2, 100, 80)[i].numpy().astype(np.float64))
    out = tmp_path / "alice.safetensors"
    common = ["--dreampose", tiny_dreampose_file, "--clip", tiny_clip_folder, "--images", str(images),
              "--width", "64", "--height", "64", "--threads", "1"]
    args = ["finetune-subject", *common, "--poses", str(poses), "--steps", "2", "--lr", "1e-3", "--out", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "2 steps" in captured.out
    assert "finetune UNet+adapter: 100%" in captured.err and "2/2" in captured.err and "loss=" in captured.err
    assert cli.main(args) == 0
    assert "0 steps trained" in capsys.readouterr().out
    vae_out = tmp_path / "alice_vae.safetensors"
    assert cli.main(["finetune-vae", *common, "--steps", "2", "--out", str(vae_out), "--quiet"]) == 0
    assert "VAE decoder" in capsys.readouterr().out
    anim = tmp_path / "anim"
    assert cli.main(["animate", "--dreampose", tiny_dreampose_file, "--clip", tiny_clip_folder, "--image",
                     str(images / "frame_0.png"), "--poses", str(poses), "--subject", str(out), "--subject",
                     str(vae_out), "--width", "64", "--height", "64", "--steps", "2", "--out", str(anim), "--quiet",
                     "--threads", "1"]) == 0
    assert (anim / "frame_0001.png").is_file()
    # wrong inputs: one line, status 2, nothing written
    assert cli.main(["finetune-subject", *common, "--poses", str(poses), "--out", str(tmp_path / "x.pt")]) == 2
    one = ["--dreampose", tiny_dreampose_file, "--clip", tiny_clip_folder, "--images", str(images / "frame_0.png")]
    assert cli.main(["finetune-subject", *one, "--poses", str(poses), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "1 image(s) but 2 pose file(s)" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


def test_cli_bench_finetune_reports_every_mode(tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--finetune", "--finetune-steps", "2", "--width", "64", "--height", "64", "--quiet",
                     "--threads", "1", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert list(result["modes"]) == ["full", "full+checkpointing", "lora", "vae"]
    for mode in result["modes"].values():
        assert mode["seconds_per_step"] > 0 and mode["peak_memory_mib"] > 0
    full, lora = result["modes"]["full"], result["modes"]["lora"]
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    assert full["last_loss"] == result["modes"]["full+checkpointing"]["last_loss"]
