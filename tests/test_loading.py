"""The loaders, on tiny random models of the real classes written in the real file layouts.

Each test writes (or takes from conftest) files made from a known model, loads them through the
public loaders and compares tensors bit for bit, or checks that a wrong input is refused with a
DreamPoseError that names the file before any weights are read.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import AUTHORS_EPOCH, assert_same_tensors, diffusers_to_ldm_single_file, old_vae_attention_names
from safetensors.torch import save_file

import dreampose.loaders.components as loading
import dreampose.loaders.load as model_mod
from dreampose.demo import tiny
from dreampose.pipeline import images, poses
from dreampose.files.weights import (guess_kind, modernise_vae_keys, peek_keys, read_metadata, read_state_dict,
                                     strip_module_prefix)
from dreampose.errors import DreamPoseError
from dreampose.files.paths import read_json_config as read_json
from dreampose.loaders.components import (instantiate, load_authors_adapter, load_authors_unet, load_base_unet,
                                          load_clip_vision, load_vae)
from dreampose.loaders.load import convert_authors_checkpoint, load_dreampose
from dreampose.settings import UNET_IN_CHANNELS


def no_meta(module: torch.nn.Module) -> bool:
    return not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def clip_features(clip, seed: int = 0) -> torch.Tensor:
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return clip(pixel_values=pixels).last_hidden_state


@pytest.fixture()
def no_weight_reads(monkeypatch):
    """Fail the test if any weights are read. Headers are allowed: safetensors metadata and a
    memory-mapped ``torch.load``, which unpickles the key index but leaves the tensors on disk."""
    real_load = torch.load

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"weights were read from {path} before the input was validated")

    def load_only_mapped(path, *args, **kwargs):
        return real_load(path, *args, **kwargs) if kwargs.get("mmap") else refuse(path)
    monkeypatch.setattr(loading, "read_state_dict", refuse)
    monkeypatch.setattr(model_mod, "read_state_dict", refuse)
    monkeypatch.setattr(torch, "load", load_only_mapped)


# ============================================================ 1. the authors' layouts

def test_authors_release_loads_bit_identical(authors_release, tiny_clip_folder, tiny_unet_config, tiny_vae_config):
    # the files really are in the authors' layout (otherwise this test proves nothing)
    raw_unet = torch.load(authors_release.unet_path, weights_only=True)
    assert all(k.startswith("module.") for k in raw_unet)
    raw_vae = torch.load(authors_release.vae_path, weights_only=True)
    assert any(k.endswith("attentions.0.query.weight") for k in raw_vae)
    assert not any(".to_q." in k for k in raw_vae)

    m = load_dreampose(dreampose=authors_release.unet_path, vae=authors_release.vae_path, clip=tiny_clip_folder,
                       unet_config=tiny_unet_config, vae_config=tiny_vae_config)
    assert m.convention == "official"
    assert m.unet.config.in_channels == UNET_IN_CHANNELS
    assert m.unet.conv_in.weight.shape[1] == 14
    assert_same_tensors(m.unet.state_dict(), authors_release.unet_state)
    assert_same_tensors(m.adapter.state_dict(), authors_release.adapter_state)
    assert_same_tensors(m.vae.state_dict(), authors_release.vae_state)
    assert m.info["adapter"] == authors_release.adapter_path  # found beside unet_epoch_7.pth
    for part in (m.unet, m.adapter, m.vae, m.clip):
        assert no_meta(part)
        assert not any(p.requires_grad for p in part.parameters())


def test_authors_unet_ignores_the_saved_four_channel_config(authors_release):
    saved = read_json(authors_release.checkpoint_unet_config)
    assert saved["in_channels"] == 4  # as in the authors' checkpoint-N/unet/config.json
    unet = load_authors_unet(authors_release.unet_path, saved)
    assert unet.config.in_channels == 14
    assert_same_tensors(unet.state_dict(), authors_release.unet_state)


def test_authors_unet_with_their_pipeline_folder_as_base(authors_release, tiny_clip_folder, tiny_unet_config):
    """checkpoint-N/ gives the VAE (a diffusers < 0.17 .bin) and the scheduler; its UNet config is never used."""
    m = load_dreampose(dreampose=authors_release.unet_path, base=authors_release.pipeline_folder,
                       clip=tiny_clip_folder, unet_config=tiny_unet_config)
    assert m.unet.config.in_channels == 14
    assert_same_tensors(m.unet.state_dict(), authors_release.unet_state)
    assert_same_tensors(m.vae.state_dict(), authors_release.pipeline_vae_state)
    assert m.scheduler_config["_diffusers_version"] == "0.11.1"  # read from checkpoint-7/scheduler
    assert m.convention == "official"


def test_authors_unet_and_adapter_without_module_prefix_and_legacy_pickle(tmp_path, authors_release,
                                                                           tiny_unet_config):
    unet_path = tmp_path / "unet_epoch_3.pth"
    torch.save(authors_release.unet_state, unet_path)  # single-process run: no prefix
    adapter_path = tmp_path / "adapter_3.pth"
    torch.save(authors_release.adapter_state, adapter_path, _use_new_zipfile_serialization=False)
    assert_same_tensors(load_authors_unet(str(unet_path), tiny_unet_config).state_dict(), authors_release.unet_state)
    assert_same_tensors(load_authors_adapter(str(adapter_path)).state_dict(), authors_release.adapter_state)


def test_authors_vae_with_module_prefix_and_modern_names_both_load(tmp_path, authors_release, tiny_vae_config):
    prefixed = tmp_path / "vae_prefixed.pth"
    torch.save({f"module.{k}": v for k, v in old_vae_attention_names(authors_release.vae_state).items()}, prefixed)
    modern = tmp_path / "vae_modern.pth"
    torch.save(authors_release.vae_state, modern)
    for path in (prefixed, modern):
        assert_same_tensors(load_vae(str(path), tiny_vae_config).state_dict(), authors_release.vae_state)


def test_explicit_adapter_path_with_another_name(tmp_path, authors_release, tiny_clip_folder, tiny_unet_config,
                                                 tiny_vae_config):
    unet = tmp_path / "my_unet.pth"
    shutil.copy(authors_release.unet_path, unet)
    adapter = tmp_path / "my_adapter.pth"
    shutil.copy(authors_release.adapter_path, adapter)
    m = load_dreampose(dreampose=str(unet), adapter=str(adapter), vae=authors_release.vae_path,
                       clip=tiny_clip_folder, unet_config=tiny_unet_config, vae_config=tiny_vae_config)
    assert_same_tensors(m.adapter.state_dict(), authors_release.adapter_state)


def test_missing_adapter_beside_authors_unet_names_the_expected_file(tmp_path, authors_release, tiny_clip_folder,
                                                                     no_weight_reads):
    unet = tmp_path / f"unet_epoch_{AUTHORS_EPOCH}.pth"
    shutil.copy(authors_release.unet_path, unet)
    with pytest.raises(DreamPoseError, match=rf"adapter_{AUTHORS_EPOCH}\.pth"):
        load_dreampose(dreampose=str(unet), vae=authors_release.vae_path, clip=tiny_clip_folder)


def test_authors_unet_without_vae_or_base_is_refused(authors_release, tiny_clip_folder, no_weight_reads):
    with pytest.raises(DreamPoseError, match="vae_N.pth"):
        load_dreampose(dreampose=authors_release.unet_path, clip=tiny_clip_folder)


def test_strip_module_prefix_only_strips_a_leading_prefix():
    t = torch.zeros(1)
    state = {"module.conv_in.weight": t, "down.module.proj.weight": t, "modules.x": t,
             "module.a.module.b": t, "plain": t}
    assert sorted(strip_module_prefix(state)) == sorted(
        ["conv_in.weight", "down.module.proj.weight", "modules.x", "a.module.b", "plain"])


def test_modernise_vae_keys_maps_all_four_old_names_and_leaves_others():
    t = torch.zeros(1)
    state = {f"encoder.mid_block.attentions.0.{n}.{p}": t for n in ("query", "key", "value", "proj_attn")
             for p in ("weight", "bias")}
    state["encoder.mid_block.attentions.0.group_norm.weight"] = t
    state["decoder.conv_in.weight"] = t
    out = modernise_vae_keys(state)
    modern = [f"encoder.mid_block.attentions.0.{n}.{p}" for n in ("to_q", "to_k", "to_v", "to_out.0")
              for p in ("weight", "bias")]
    assert sorted(out) == sorted(modern + ["encoder.mid_block.attentions.0.group_norm.weight",
                                           "decoder.conv_in.weight"])


# ============================================================ 2. our format

def test_our_format_round_trip(tiny_dreampose_file, tiny_dreampose_model, tiny_clip_folder):
    meta = read_metadata(tiny_dreampose_file)
    assert meta["format"] == "dreampose" and meta["convention"] == "standard"
    m = load_dreampose(dreampose=tiny_dreampose_file, clip=tiny_clip_folder)  # configs come from the metadata
    original = tiny_dreampose_model
    assert_same_tensors(m.unet.state_dict(), original.unet.state_dict())
    assert_same_tensors(m.adapter.state_dict(), original.adapter.state_dict())
    assert_same_tensors(m.vae.state_dict(), original.vae.state_dict())
    assert_same_tensors(m.clip.state_dict(), original.clip.state_dict())
    assert m.convention == "standard"
    assert m.scheduler_config == original.scheduler_config
    assert m.info["subject"] == "tiny subject"
    assert json.loads(m.info["finetuned"]) == ["unet", "adapter"]
    assert m.unet.config.in_channels == 14


def test_our_format_convention_is_kept_and_can_be_overridden(tmp_path, tiny_dreampose_model, tiny_clip_folder):
    path = str(tmp_path / "official.safetensors")
    tiny_dreampose_model.shallow_copy(convention="official").save(path, include_vae=True)
    assert load_dreampose(dreampose=path, clip=tiny_clip_folder).convention == "official"
    assert load_dreampose(dreampose=path, clip=tiny_clip_folder, convention="standard").convention == "standard"
    with pytest.raises(DreamPoseError, match="convention"):
        load_dreampose(dreampose=path, clip=tiny_clip_folder, convention="sideways")


def test_our_format_with_a_bad_convention_in_metadata_is_refused(tmp_path, tiny_dreampose_model, tiny_clip_folder):
    path = str(tmp_path / "bad.safetensors")
    tiny_dreampose_model.shallow_copy(convention="sideways").save(path, include_vae=True)
    with pytest.raises(DreamPoseError, match="sideways"):
        load_dreampose(dreampose=path, clip=tiny_clip_folder)


def test_our_format_without_vae_takes_the_base_vae_and_needs_one(tmp_path, tiny_dreampose_model, tiny_clip_folder,
                                                                 tiny_sd_folder):
    path = str(tmp_path / "novae.safetensors")
    tiny_dreampose_model.save(path)
    with pytest.raises(DreamPoseError, match="has no VAE"):
        load_dreampose(dreampose=path, clip=tiny_clip_folder)
    m = load_dreampose(dreampose=path, clip=tiny_clip_folder, base=tiny_sd_folder)
    assert_same_tensors(m.vae.state_dict(), tiny.tiny_vae(1).state_dict())
    assert_same_tensors(m.unet.state_dict(), tiny_dreampose_model.unet.state_dict())


def test_our_scheduler_config_wins_over_the_base_folders(tmp_path, tiny_dreampose_model, tiny_clip_folder,
                                                        tiny_sd_folder):
    path = str(tmp_path / "sched.safetensors")
    custom = dict(tiny_dreampose_model.scheduler_config, beta_end=0.02)
    tiny_dreampose_model.shallow_copy(scheduler_config=custom).save(path)
    m = load_dreampose(dreampose=path, clip=tiny_clip_folder, base=tiny_sd_folder)
    assert m.scheduler_config["beta_end"] == 0.02


def test_fp16_file_loads_as_fp16_without_meta_tensors(tmp_path, tiny_dreampose_model, tiny_clip_folder):
    half = tiny.tiny_dreampose(seed=0).to(unet_dtype=torch.float16, vae_dtype=torch.float16)
    path = half.save(str(tmp_path / "half.safetensors"), include_vae=True)
    m = load_dreampose(dreampose=path, clip=tiny_clip_folder)
    for part in (m.unet, m.adapter, m.vae):
        assert {p.dtype for p in part.parameters()} == {torch.float16}
        assert no_meta(part)
    assert_same_tensors(m.unet.state_dict(), half.unet.state_dict())
    expected = tiny_dreampose_model.unet.conv_in.weight.half()
    assert torch.equal(m.unet.conv_in.weight, expected)


def test_fp16_clip_file_loads_as_fp16_and_keeps_its_position_ids(tmp_path, tiny_clip_config):
    clip = tiny.tiny_clip(2)
    path = tmp_path / "clip_fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items() if "position_ids" not in k}, path)
    loaded = load_clip_vision(str(path), tiny_clip_config)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert no_meta(loaded)
    (name, ids), = [(n, b) for n, b in loaded.named_buffers() if n.endswith("position_ids")]
    assert torch.equal(ids, dict(clip.named_buffers())[name])  # a real buffer, not meta, not garbage


def test_instantiate_does_not_random_initialise(monkeypatch, tiny_unet_config):
    """Weights come from the file: building must not run the (for 860M parameters, slow) random init."""
    state = tiny.tiny_base_unet(0).state_dict()
    calls = []
    original = torch.nn.init.kaiming_uniform_

    def spy(tensor, *a, **k):
        calls.append(tensor.is_meta)
        return original(tensor, *a, **k)
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    from diffusers import UNet2DConditionModel
    unet = instantiate(lambda: UNet2DConditionModel(**tiny_unet_config), state, "UNet", "test")
    assert calls and all(calls)  # init ran, but only on meta tensors (free)
    assert_same_tensors(unet.state_dict(), state)


def test_convert_authors_checkpoint_to_our_format(tmp_path, authors_release, tiny_clip_folder, tiny_unet_config,
                                                  tiny_vae_config):
    out = convert_authors_checkpoint(authors_release.unet_path, str(tmp_path / "converted.safetensors"),
                                     vae_path=authors_release.vae_path, unet_config=tiny_unet_config,
                                     vae_config=tiny_vae_config)
    meta = read_metadata(out)
    assert meta["format"] == "dreampose" and meta["convention"] == "official"
    assert meta["source"] == f"unet_epoch_{AUTHORS_EPOCH}.pth"
    m = load_dreampose(dreampose=out, clip=tiny_clip_folder)
    assert m.convention == "official"
    assert_same_tensors(m.unet.state_dict(), authors_release.unet_state)
    assert_same_tensors(m.adapter.state_dict(), authors_release.adapter_state)
    assert_same_tensors(m.vae.state_dict(), authors_release.vae_state)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # atomic write left nothing behind


def test_convert_without_adapter_is_refused(tmp_path, authors_release):
    unet = tmp_path / "unet_epoch_9.pth"
    shutil.copy(authors_release.unet_path, unet)
    with pytest.raises(DreamPoseError, match=r"adapter_9\.pth"):
        convert_authors_checkpoint(str(unet), str(tmp_path / "x.safetensors"))
    with pytest.raises(DreamPoseError, match="not found"):
        convert_authors_checkpoint(str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


# ============================================================ 3. Stable Diffusion 1.x

def test_sd_diffusers_folder_loads_bit_identical(tiny_sd_folder):
    assert_same_tensors(load_base_unet(tiny_sd_folder).state_dict(), tiny.tiny_base_unet(0).state_dict())
    assert_same_tensors(load_vae(tiny_sd_folder).state_dict(), tiny.tiny_vae(1).state_dict())
    # a component folder works as well as the pipeline folder
    assert_same_tensors(load_vae(os.path.join(tiny_sd_folder, "vae")).state_dict(), tiny.tiny_vae(1).state_dict())


def test_sd_single_ldm_file_loads_bit_identical(tiny_sd_single_file, tiny_unet_config, tiny_vae_config):
    keys = peek_keys(tiny_sd_single_file)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    assert_same_tensors(load_base_unet(tiny_sd_single_file, tiny_unet_config).state_dict(),
                        tiny.tiny_base_unet(0).state_dict())
    assert_same_tensors(load_vae(tiny_sd_single_file, tiny_vae_config).state_dict(), tiny.tiny_vae(1).state_dict())


def test_sd_single_ldm_ckpt_pickle_with_state_dict_wrapper(tmp_path, tiny_unet_config, tiny_vae_config):
    ldm = diffusers_to_ldm_single_file(tiny.tiny_base_unet(0), tiny_unet_config, tiny.tiny_vae(1))
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm}, path)  # how ldm training wrote .ckpt files (global_step etc. omitted)
    assert_same_tensors(load_base_unet(str(path), tiny_unet_config).state_dict(), tiny.tiny_base_unet(0).state_dict())


@pytest.mark.parametrize("base_kind", ["folder", "single_file"])
def test_fresh_model_from_base(request, base_kind, tiny_clip_folder, tiny_unet_config, tiny_vae_config):
    base = request.getfixturevalue("tiny_sd_folder" if base_kind == "folder" else "tiny_sd_single_file")
    m = load_dreampose(base=base, clip=tiny_clip_folder, unet_config=None if base_kind == "folder" else
                       tiny_unet_config, vae_config=None if base_kind == "folder" else tiny_vae_config)
    ref = tiny.tiny_base_unet(0).state_dict()
    got = m.unet.state_dict()
    assert got["conv_in.weight"].shape == (32, 14, 3, 3)
    assert torch.equal(got["conv_in.weight"][:, :4], ref["conv_in.weight"])
    assert torch.count_nonzero(got["conv_in.weight"][:, 4:]) == 0
    assert torch.equal(got["conv_in.bias"], ref["conv_in.bias"])
    assert_same_tensors({k: v for k, v in got.items() if k != "conv_in.weight"},
                        {k: v for k, v in ref.items() if k != "conv_in.weight"})
    assert_same_tensors(m.vae.state_dict(), tiny.tiny_vae(1).state_dict())
    assert m.convention == "standard"
    w = m.adapter.linear1.weight
    assert torch.equal(w, torch.eye(50, 54))  # fresh adapter: identity over CLIP tokens, zero VAE tokens
    assert m.scheduler_config["_class_name"] == "PNDMScheduler"


# ============================================================ 4. CLIP

def test_clip_both_folder_layouts_give_the_original_outputs(tiny_clip_folder, tiny_clip_folder_hub_layout):
    expected = clip_features(tiny.tiny_clip(2))
    for folder in (tiny_clip_folder, tiny_clip_folder_hub_layout):
        clip = load_clip_vision(folder)
        assert no_meta(clip)
        assert torch.equal(clip_features(clip), expected)


def test_clip_single_file_and_full_clip_state_dict(tmp_path, tiny_clip_folder_hub_layout, tiny_clip_config):
    single = os.path.join(tiny_clip_folder_hub_layout, "model.safetensors")
    expected = clip_features(tiny.tiny_clip(2))
    assert torch.equal(clip_features(load_clip_vision(single, tiny_clip_config)), expected)

    full = dict(read_state_dict(single))  # vision_model.* plus a text tower and projections
    g = torch.Generator().manual_seed(0)
    full.update({"text_model.embeddings.token_embedding.weight": torch.randn(10, 32, generator=g),
                 "text_model.final_layer_norm.weight": torch.ones(32),
                 "visual_projection.weight": torch.randn(32, 32, generator=g),
                 "text_projection.weight": torch.randn(32, 32, generator=g), "logit_scale": torch.tensor(2.6)})
    path = tmp_path / "clip_full.bin"
    torch.save(full, path)
    assert torch.equal(clip_features(load_clip_vision(str(path), tiny_clip_config)), expected)

    # a full CLIPModel folder: config with vision_config
    folder = tmp_path / "clip_full_folder"
    folder.mkdir()
    save_file(full, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": tiny_clip_config,
                                                    "text_config": {}}))
    assert torch.equal(clip_features(load_clip_vision(str(folder))), expected)


def test_clip_that_does_not_fit_is_an_error_never_random(tmp_path, tiny_clip_folder, tiny_clip_config):
    single = os.path.join(tiny_clip_folder, "model.safetensors")
    # tiny weights against the shipped ViT-B/32 config: hidden size 32 vs 768
    with pytest.raises(DreamPoseError, match="wrong shape"):
        load_clip_vision(single)
    # half the weights missing
    state = read_state_dict(single)
    names = sorted(state)
    half = tmp_path / "half.safetensors"
    save_file({k: state[k] for k in names[::2]}, half)
    with pytest.raises(DreamPoseError, match="missing"):
        load_clip_vision(str(half), tiny_clip_config)
    # a folder whose config does not match its weights
    folder = tmp_path / "wrong_config"
    shutil.copytree(tiny_clip_folder, folder)
    (folder / "config.json").write_text(json.dumps(dict(tiny_clip_config, hidden_size=64)))
    with pytest.raises(DreamPoseError, match="does not fit"):
        load_clip_vision(str(folder))
    (folder / "config.json").write_text("{ damaged")
    with pytest.raises(DreamPoseError, match="not a readable JSON config"):
        load_clip_vision(str(folder))
    (folder / "config.json").unlink()  # no config: the shipped ViT-B/32 one, which these weights do not fit
    with pytest.raises(DreamPoseError, match="wrong shape"):
        load_clip_vision(str(folder))


# ============================================================ 6. bad input

@pytest.mark.parametrize("role", ["clip", "dreampose", "base", "vae", "adapter"])
def test_missing_files_are_named_before_anything_loads(tmp_path, role, authors_release, tiny_clip_folder,
                                                       tiny_sd_folder, no_weight_reads):
    args = {"clip": tiny_clip_folder, "dreampose": authors_release.unet_path, "base": tiny_sd_folder,
            "vae": authors_release.vae_path, "adapter": authors_release.adapter_path}
    missing = str(tmp_path / f"no_such_{role}.pth")
    args[role] = missing
    with pytest.raises(DreamPoseError, match="not found") as err:
        load_dreampose(**args)
    assert missing in str(err.value)


def test_no_clip_given_is_an_error(tiny_sd_folder, no_weight_reads):
    for clip in ("", None):
        with pytest.raises(DreamPoseError, match="CLIP"):
            load_dreampose(clip=clip, base=tiny_sd_folder)


def test_nothing_to_build_from_is_an_error(tiny_clip_folder, no_weight_reads):
    with pytest.raises(DreamPoseError, match="base model"):
        load_dreampose(clip=tiny_clip_folder)


def test_a_folder_without_the_authors_unet_is_an_error(tmp_path, tiny_clip_folder, no_weight_reads):
    with pytest.raises(DreamPoseError, match="is a folder without the authors' unet_epoch_N.pth"):
        load_dreampose(dreampose=str(tmp_path), clip=tiny_clip_folder)


def test_the_authors_release_folder_loads_its_newest_epoch(authors_release, tiny_clip_folder, tiny_unet_config,
                                                           tiny_vae_config):
    m = load_dreampose(dreampose=authors_release.folder, vae=authors_release.vae_path, clip=tiny_clip_folder,
                       unet_config=tiny_unet_config, vae_config=tiny_vae_config)
    assert m.info["dreampose"] == authors_release.unet_path
    assert_same_tensors(m.unet.state_dict(), authors_release.unet_state)
    assert_same_tensors(m.adapter.state_dict(), authors_release.adapter_state)


def test_sd_safetensors_as_dreampose_weights_is_refused(tiny_sd_single_file, tiny_clip_folder, no_weight_reads):
    with pytest.raises(DreamPoseError, match="no DreamPose metadata.*Stable Diffusion checkpoint.*base model"):
        load_dreampose(dreampose=tiny_sd_single_file, clip=tiny_clip_folder, base=tiny_sd_single_file)


def test_sd_ckpt_as_dreampose_weights_is_refused(tmp_path, tiny_sd_single_file, authors_release, tiny_clip_folder,
                                                 monkeypatch):
    ckpt = tmp_path / "sd15.ckpt"
    torch.save(read_state_dict(tiny_sd_single_file), ckpt)
    monkeypatch.setattr(loading, "read_state_dict", lambda *a, **k: pytest.fail("weights read"))
    for adapter in (None, authors_release.adapter_path):
        with pytest.raises(DreamPoseError, match="DreamPose weights.*full Stable Diffusion checkpoint.*base model"):
            load_dreampose(dreampose=str(ckpt), adapter=adapter, clip=tiny_clip_folder, base=tiny_sd_single_file)


def test_unet_file_not_named_like_the_authors_without_adapter(tmp_path, authors_release, tiny_clip_folder,
                                                              no_weight_reads):
    unet = tmp_path / "weights.pth"
    shutil.copy(authors_release.unet_path, unet)
    with pytest.raises(DreamPoseError, match="not a DreamPose file.*unet_epoch_N.pth with its adapter_N.pth"):
        load_dreampose(dreampose=str(unet), clip=tiny_clip_folder, vae=authors_release.vae_path)


def test_safetensors_without_our_metadata_is_refused(tmp_path, tiny_clip_folder, no_weight_reads):
    path = tmp_path / "random.safetensors"
    save_file({"foo": torch.zeros(2)}, path)
    with pytest.raises(DreamPoseError, match="no DreamPose metadata"):
        load_dreampose(dreampose=str(path), clip=tiny_clip_folder, base=str(tmp_path))


@pytest.mark.parametrize("role, wrong, expected", [
    ("clip", "vae", "looks like a VAE"),
    ("vae", "clip", "looks like a CLIP"),
    ("adapter", "vae", "looks like a VAE"),
    ("base", "adapter", "looks like a DreamPose adapter"),
    ("dreampose", "adapter", "looks like a DreamPose adapter"),
])
def test_files_given_for_the_wrong_input_are_refused_before_loading(
        role, wrong, expected, authors_release, tiny_clip_folder, tiny_sd_folder, no_weight_reads):
    files = {"clip": os.path.join(tiny_clip_folder, "model.safetensors"), "vae": authors_release.vae_path,
             "adapter": authors_release.adapter_path}
    args = {"clip": files["clip"], "dreampose": authors_release.unet_path, "base": tiny_sd_folder,
            "vae": authors_release.vae_path, "adapter": authors_release.adapter_path}
    args[role] = files[wrong]
    with pytest.raises(DreamPoseError, match=expected) as err:
        load_dreampose(**args)
    assert files[wrong] in str(err.value) and "given as the" in str(err.value)


def test_loaders_name_what_a_wrong_file_is(authors_release, tiny_clip_folder, tiny_sd_folder, tiny_unet_config):
    clip_file = os.path.join(tiny_clip_folder, "model.safetensors")
    with pytest.raises(DreamPoseError, match="no CLIP vision weights.*looks like a VAE"):
        load_clip_vision(authors_release.vae_path)
    with pytest.raises(DreamPoseError, match="not a VAE, it looks like a CLIP"):
        load_vae(clip_file)
    with pytest.raises(DreamPoseError, match="not a DreamPose adapter.*diffusers UNet"):
        load_authors_adapter(authors_release.unet_path)
    with pytest.raises(DreamPoseError, match="not a full Stable Diffusion 1.x checkpoint.*VAE"):
        load_base_unet(authors_release.vae_path)
    with pytest.raises(DreamPoseError, match="not a diffusers folder.*config.json is for clip_vision_model"):
        load_base_unet(tiny_clip_folder)  # has a config.json, but a transformers one
    with pytest.raises(DreamPoseError, match="not a diffusers folder with a AutoencoderKL.*UNet2DConditionModel"):
        load_vae(os.path.join(tiny_sd_folder, "unet"))


def test_unet_file_with_the_wrong_layout(tmp_path, tiny_unet_config):
    base = tiny.tiny_base_unet(0).state_dict()
    four = tmp_path / "unet_epoch_1.pth"
    torch.save(base, four)  # a 4-channel SD UNet, not DreamPose's 14
    with pytest.raises(DreamPoseError, match=r"wrong shape.*conv_in\.weight: file \(32, 4, 3, 3\), model \(32, 14"):
        load_authors_unet(str(four), tiny_unet_config)
    partial = tmp_path / "unet_epoch_2.pth"
    torch.save({k: v for i, (k, v) in enumerate(tiny.tiny_dreampose().unet.state_dict().items()) if i % 3 != 1},
               partial)
    with pytest.raises(DreamPoseError, match="missing"):
        load_authors_unet(str(partial), tiny_unet_config)
    with pytest.raises(DreamPoseError, match="wrong shape"):  # a tiny file against the full SD 1.x config
        load_authors_unet(str(tmp_path / "unet_epoch_1.pth"))


@pytest.mark.parametrize("name, content", [
    ("empty.pth", b""), ("garbage.pth", b"this is not a checkpoint at all"),
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"),
    ("empty.safetensors", b""), ("weights.txt", b"0 1 2"),
])
def test_unreadable_files_are_dreampose_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DreamPoseError, match=name.replace(".", r"\.")):
        read_state_dict(str(path))


def test_truncated_zip_checkpoint_is_a_dreampose_error(tmp_path, authors_release):
    data = open(authors_release.adapter_path, "rb").read()
    cut = tmp_path / "adapter_1.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DreamPoseError, match="not a readable PyTorch weights file"):
        load_authors_adapter(str(cut))


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(DreamPoseError, match="dict of tensors"):
        read_state_dict(str(path))
    path2 = tmp_path / "mixed.pth"
    torch.save({"a": torch.zeros(1), "step": 5}, path2)
    with pytest.raises(DreamPoseError, match="'step'"):
        read_state_dict(str(path2))


def test_guess_kind_recognises_each_layout(authors_release, tiny_sd_single_file, tiny_clip_folder,
                                           tiny_clip_folder_hub_layout, tiny_dreampose_file):
    assert guess_kind(peek_keys(authors_release.unet_path)) == "unet"
    assert guess_kind(peek_keys(authors_release.adapter_path)) == "adapter"
    assert guess_kind(peek_keys(authors_release.vae_path)) == "vae"
    assert guess_kind(peek_keys(tiny_sd_single_file)) == "sd_checkpoint"
    assert guess_kind(peek_keys(os.path.join(tiny_clip_folder, "model.safetensors"))) == "clip"
    assert guess_kind(peek_keys(os.path.join(tiny_clip_folder_hub_layout, "model.safetensors"))) == "clip"
    assert guess_kind(peek_keys(tiny_dreampose_file)) == "dreampose"
    assert guess_kind(["foo"]) == "unknown"


# ---------------------------------------------------------------- images and poses

@pytest.mark.parametrize("channels, word", [(4, "RGBA"), (1, "greyscale"), (2, "greyscale")])
def test_check_image_refuses_non_rgb(channels, word):
    with pytest.raises(DreamPoseError, match=word):
        images.check_image(torch.rand(1, channels, 64, 64))


def test_check_image_accepts_rgb_and_converts_to_uint8():
    img = torch.full((3, 8, 8), 0.5)
    out = images.check_image(img)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 8, 8) and int(out[0, 0, 0, 0]) == 128
    with pytest.raises(DreamPoseError, match="batch of 2"):
        images.check_image(torch.rand(2, 3, 8, 8))


def test_pose_sequence_errors():
    with pytest.raises(DreamPoseError, match="empty"):
        poses.check_uv(torch.zeros(0, 2, 64, 64))
    with pytest.raises(DreamPoseError, match="U and V"):
        poses.check_uv(torch.zeros(3, 3, 64, 64))
    with pytest.raises(DreamPoseError, match="multiple of 64"):
        poses.make_pose_windows(torch.zeros(2, 2, 64, 64), height=100, width=64)
    with pytest.raises(DreamPoseError, match="multiple of 64"):
        poses.make_pose_windows(torch.zeros(2, 2, 64, 64), height=640, width=500)


def test_uv_folder_is_in_numeric_order_and_rejects_mixed_sizes(tmp_path):
    for n in (10, 2, 1):
        np.save(tmp_path / f"frame_{n}_densepose.npy", np.full((2, 8, 8), n / 16, dtype=np.float64))
    np.save(tmp_path / "frame_x_densepose.npy", np.zeros((2, 8, 8)))  # not a frame: ignored
    uv = poses.load_uv_folder(str(tmp_path))
    assert uv.shape == (3, 2, 8, 8) and uv.dtype == torch.float32
    assert (uv[:, 0, 0, 0] * 16).tolist() == [1.0, 2.0, 10.0]
    np.save(tmp_path / "frame_11_densepose.npy", np.zeros((2, 8, 16)))
    with pytest.raises(DreamPoseError, match="different sizes"):
        poses.load_uv_folder(str(tmp_path))
    with pytest.raises(DreamPoseError, match="not found"):
        poses.load_uv_folder(str(tmp_path / "nope"))


def test_uv_file_with_the_wrong_shape(tmp_path):
    np.save(tmp_path / "frame_0_densepose.npy", np.zeros((3, 8, 8)))
    with pytest.raises(DreamPoseError, match=r"\(2, H, W\)"):
        poses.load_uv_file(str(tmp_path / "frame_0_densepose.npy"))


def test_the_authors_files_take_a_diffusers_bases_configs(authors_release, tiny_sd_folder, tiny_clip_folder):
    """Their .pth files carry no config; against a base that is not SD 1.x sized (here the tiny one) the
    base's UNet and VAE configs are used instead of failing on shapes."""
    m = load_dreampose(dreampose=authors_release.unet_path, vae=authors_release.vae_path, base=tiny_sd_folder,
                       clip=tiny_clip_folder)
    assert m.unet.config.in_channels == UNET_IN_CHANNELS
    assert_same_tensors(m.unet.state_dict(), authors_release.unet_state)
    assert_same_tensors(m.vae.state_dict(), authors_release.vae_state)
