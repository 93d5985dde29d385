"""SubjectFinetune and VAEDecoderFinetune inside a real ComfyUI 0.3.75 host, on the CPU.

One graph finetunes a tiny DreamPose on two photos and animates it (LoadDreamPose → SubjectFinetune →
VAEDecoderFinetune → CLIPVAEAdapterEncode → DensePoseWindow5 → DualCFGSampler → SaveImage). The
same prompt run again in a fresh host trains nothing (the saved finetunes are found by cache key)
and gives the same frames; LoadDreamPose's ``subject`` applies a saved finetune; Cancel during
training leaves no file; bad names and pose counts fail with our messages.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from host_helpers import COMFY_DIR, HOST, ROOT, Env, log, node, object_info_checks, write_uv_folder

pytestmark = pytest.mark.host

if COMFY_DIR is None:
    pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh (scripts/test.sh does)",
                allow_module_level=True)

WORKFLOW = ROOT / "workflows" / "dreampose_finetune_animate.json"

INPUT_ORDER = {
    "SubjectFinetune": ["model", "images", "poses", "name", "steps", "lr", "seed", "crop", "flip",
                        "gradient_checkpointing", "precision", "optimizer", "lora_rank"],
    "VAEDecoderFinetune": ["model", "images", "name", "steps", "lr", "seed", "crop", "flip", "precision",
                           "decoder_loss", "decoder_blend"],
}
OUTPUTS = {"SubjectFinetune": ["DREAMPOSE_MODEL"], "VAEDecoderFinetune": ["DREAMPOSE_MODEL", "VAE"]}
# the authors' finetunes: what the shipped finetune workflow keeps
PAPER_VALUES = {
    "SubjectFinetune": {"name": "subject", "steps": 500, "lr": 1e-5, "seed": 0, "crop": True, "flip": False,
                        "gradient_checkpointing": False, "precision": "fp32", "optimizer": "adamw", "lora_rank": 0},
    "VAEDecoderFinetune": {"name": "subject_vae", "steps": 1500, "lr": 5e-5, "seed": 0, "crop": True, "flip": False,
                           "precision": "fp32", "decoder_loss": "mse", "decoder_blend": 1.0},
}
# the nodes' defaults: the fast preset (LoRA rank 16, 100 + 100 steps at 1e-4)
DEFAULTS = {
    "SubjectFinetune": {**PAPER_VALUES["SubjectFinetune"], "steps": 100, "lr": 1e-4, "lora_rank": 16},
    "VAEDecoderFinetune": {**PAPER_VALUES["VAEDecoderFinetune"], "steps": 100, "lr": 1e-4},
}

SUBJECT_STEPS, VAE_STEPS = 2, 2
SIZE = 64           # output frames (the finetunes train at DreamPose's 512×640)
PHOTOS = 2
SUBJECT_NODE, VAE_NODE = "6", "7"


class FinetuneEnv(Env):
    """Env plus a second subject photo and the photos' own DensePose (one UV frame per photo)."""

    def __init__(self, root):
        super().__init__(root)
        with Image.open(self.key_frame) as im:
            im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(self.input / "subject_2.png")
        write_uv_folder(self.input / "subject_uv", PHOTOS, seed=5)
        write_uv_folder(self.input / "dreampose_subject_uv", 1, seed=6)   # what the shipped workflow reads
        self.subjects = self.models / "dreampose" / "subjects"

    def subject_files(self) -> list[str]:
        return sorted(os.listdir(self.subjects)) if self.subjects.is_dir() else []


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> FinetuneEnv:
    return FinetuneEnv(tmp_path_factory.mktemp("finetune"))


# the VAE finetune's appended (optional) inputs the main prompt sets; a prompt without them still validates
VAE_OPTIONS = {"decoder_loss": "l1", "decoder_blend": 0.5}


def finetune_prompt(name="alice", vae_name="alice_vae", subject_steps=SUBJECT_STEPS, uv_count=0,
                    vae_seed=4, vae_options=VAE_OPTIONS) -> dict:
    """Two photos → SubjectFinetune → VAEDecoderFinetune → encode → sample → SaveImage/SaveLatent."""
    return {
        "1": node("LoadDreamPose", dreampose_weights="tiny_dreampose.safetensors", base_model="none",
                  clip_vision="tiny-clip", vae="from weights or base", dtype="fp32", vae_dtype="fp32",
                  convention="auto", subject="none"),
        "2": node("LoadImage", image="key_frame.png"),
        "3": node("LoadImage", image="subject_2.png"),
        "5": node("ImageBatch", image1=["2", 0], image2=["3", 0]),
        "4": node("DreamPoseLoadUV", folder="subject_uv", start=0, count=uv_count),
        SUBJECT_NODE: node("SubjectFinetune", model=["1", 0], images=["5", 0], poses=["4", 0], name=name,
                           steps=subject_steps, lr=1e-3, seed=3, crop=True, flip=True, gradient_checkpointing=False,
                           precision="fp32", optimizer="adamw", lora_rank=0),
        VAE_NODE: node("VAEDecoderFinetune", model=[SUBJECT_NODE, 0], images=["5", 0], name=vae_name,
                       steps=VAE_STEPS, lr=1e-3, seed=vae_seed, crop=True, flip=False, precision="fp32",
                       **vae_options),
        "8": node("CLIPVAEAdapterEncode", model=[VAE_NODE, 0], image=["2", 0], conditioning_latent="mode", seed=0),
        "9": node("DreamPoseLoadUV", folder="dreampose_poses", start=0, count=0),
        "10": node("DensePoseWindow5", uv=["9", 0], width=SIZE, height=SIZE),
        "11": node("DualCFGSampler", model=[VAE_NODE, 0], cond=["8", 0], poses=["10", 0], s_image=3.0, s_pose=2.0,
                   steps=2, sampler="ddim", seed=5, frames_per_batch=4, start="noise", stretch="none"),
        "12": node("SaveImage", images=["11", 0], filename_prefix="ft"),
        "13": node("SaveLatent", samples=["11", 1], filename_prefix="ft"),
    }


def loaded_subject_chain() -> dict:
    """LoadDreamPose applying the saved subject finetune; the VAE finetune found again (0 steps)."""
    return {
        "21": node("LoadDreamPose", dreampose_weights="tiny_dreampose.safetensors", base_model="none",
                   clip_vision="tiny-clip", vae="from weights or base", dtype="fp32", vae_dtype="fp32",
                   convention="auto", subject="alice.safetensors"),
        "22": node("VAEDecoderFinetune", model=["21", 0], images=["5", 0], name="alice_vae", steps=VAE_STEPS,
                   lr=1e-3, seed=4, crop=True, flip=False, precision="fp32", **VAE_OPTIONS),
        "23": node("CLIPVAEAdapterEncode", model=["22", 0], image=["2", 0], conditioning_latent="mode", seed=0),
        "24": node("DualCFGSampler", model=["22", 0], cond=["23", 0], poses=["10", 0], s_image=3.0, s_pose=2.0,
                   steps=2, sampler="ddim", seed=5, frames_per_batch=4, start="noise", stretch="none"),
        "25": node("SaveLatent", samples=["24", 1], filename_prefix="loaded"),
    }


def base_chain(after_finetunes: bool) -> dict:
    """The base model from node 1, sampled like the finetuned one. With ``after_finetunes`` its key frame
    passes through the finetuned frames' batch (ImageBatch → ImageFromBatch 0: the key frame itself),
    so it runs after both finetunes trained from that same model object."""
    chain = {
        "31": node("CLIPVAEAdapterEncode", model=["1", 0], image=["2", 0], conditioning_latent="mode", seed=0),
        "32": node("DualCFGSampler", model=["1", 0], cond=["31", 0], poses=["10", 0], s_image=3.0, s_pose=2.0,
                   steps=2, sampler="ddim", seed=5, frames_per_batch=4, start="noise", stretch="none"),
        "33": node("SaveLatent", samples=["32", 1], filename_prefix="base"),
    }
    if after_finetunes:
        chain["34"] = node("ImageBatch", image1=["2", 0], image2=["11", 0])
        chain["35"] = node("ImageFromBatch", image=["34", 0], batch_index=0, length=1)
        chain["31"]["inputs"]["image"] = ["35", 0]
    return chain


def _events(path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def _latent(out, prefix) -> torch.Tensor:
    return load_file(next(out.glob(f"{prefix}_*.latent")))["latent_tensor"]


@pytest.fixture(scope="module")
def first_run(env):
    """Train both finetunes and animate, in one graph; /object_info written before."""
    assert env.subject_files() == []
    r = env.root
    proc = env.run("first", {**finetune_prompt(), **base_chain(after_finetunes=True)},
                   "--object-info", str(r / "oi.json"),
                   "--progress-log", str(r / "first-progress.json"), "--text-log", str(r / "first-text.json"))
    proc.object_info = json.loads((r / "oi.json").read_text()) if (r / "oi.json").exists() else {}
    proc.progress = _events(r / "first-progress.json")
    proc.texts = json.loads((r / "first-text.json").read_text()) if (r / "first-text.json").exists() else []
    proc.mtimes = {n: os.stat(env.subjects / n).st_mtime_ns for n in env.subject_files()}
    return proc


@pytest.fixture(scope="module")
def second_run(env, first_run):
    """The same prompt in a fresh host, plus a chain loading the subject through LoadDreamPose."""
    assert first_run.returncode == 0, log(first_run)
    r = env.root
    proc = env.run("second", {**finetune_prompt(), **loaded_subject_chain(), **base_chain(after_finetunes=False)},
                   "--object-info", str(r / "oi2.json"),
                   "--progress-log", str(r / "second-progress.json"), "--text-log", str(r / "second-text.json"))
    proc.object_info = json.loads((r / "oi2.json").read_text()) if (r / "oi2.json").exists() else {}
    proc.progress = _events(r / "second-progress.json")
    proc.texts = json.loads((r / "second-text.json").read_text()) if (r / "second-text.json").exists() else []
    return proc


def test_schema(first_run):
    assert "CUSTOM NODE IMPORT FAILED" not in first_run.stderr, log(first_run)
    oi = first_run.object_info
    object_info_checks(oi, INPUT_ORDER, OUTPUTS)
    for node_id, defaults in DEFAULTS.items():
        assert oi[node_id]["category"] == "DreamPose/finetune"
        spec = {**oi[node_id]["input"]["required"], **oi[node_id]["input"].get("optional", {})}
        assert {k: spec[k][1].get("default") for k in defaults} == defaults, node_id
        assert spec["precision"][1]["options"] == ["fp32", "bf16", "fp16"]
        # no randomize-after-queue control on a training seed: it would retrain on every queue
        assert spec["seed"][1]["control_after_generate"] is False
    assert oi["SubjectFinetune"]["input"]["required"]["optimizer"][1]["options"] == ["adamw", "adamw8bit"]
    vae_optional = oi["VAEDecoderFinetune"]["input"]["optional"]
    assert vae_optional["decoder_loss"][1]["options"] == ["mse", "l1"]
    assert (vae_optional["decoder_blend"][1]["min"], vae_optional["decoder_blend"][1]["max"]) == (0.01, 1.0)
    assert oi["SubjectFinetune"]["input"]["required"]["poses"][0] == "DREAMPOSE_POSE"
    assert oi["LoadDreamPose"]["input_order"]["required"][-1] == "subject"
    assert oi["LoadDreamPose"]["input"]["required"]["subject"][1]["options"] == ["none"]


def test_finetune_then_animate_in_one_graph(env, first_run):
    assert first_run.returncode == 0, log(first_run)
    pngs = sorted(first_run.out.glob("ft_*.png"))
    assert len(pngs) == 3
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (SIZE, SIZE)
    assert np.isfinite(_latent(first_run.out, "ft").numpy()).all()
    # one progress tick per training step for each finetune, ending full
    for node_id, steps in ((SUBJECT_NODE, SUBJECT_STEPS), (VAE_NODE, VAE_STEPS)):
        ticks = [(e["value"], e["max"]) for e in first_run.progress if e["node"] == node_id]
        assert ticks == [(i, steps) for i in range(1, steps + 1)], (node_id, ticks)
        texts = [t["text"] for t in first_run.texts if t["node"] == node_id]
        assert any(f"step {steps}/{steps}, loss " in t for t in texts), texts
        assert "saved subjects/" in texts[-1]


def test_saved_files_and_metadata(env, first_run):
    assert first_run.returncode == 0, log(first_run)
    assert env.subject_files() == ["alice.safetensors", "alice_vae.safetensors"]  # and no temp files
    metas, keys = {}, {}
    for name in env.subject_files():
        with safe_open(str(env.subjects / name), "pt") as f:
            metas[name], keys[name] = f.metadata(), list(f.keys())
    subject, vae = metas["alice.safetensors"], metas["alice_vae.safetensors"]
    assert subject["format"] == "dreampose" and subject["kind"] == "subject" and subject["finetuned"] == "unet+adapter"
    assert subject["mode"] == "full" and subject["base_model"] == "tiny_dreampose.safetensors"
    settings = json.loads(subject["settings"])
    assert (settings["steps"], settings["lr"], settings["seed"], settings["flip"]) == (SUBJECT_STEPS, 1e-3, 3, True)
    assert len(subject["cache_key"]) == 64
    assert vae["kind"] == "vae" and vae["finetuned"] == "vae_decoder"
    vae_settings = json.loads(vae["settings"])
    assert vae_settings["steps"] == VAE_STEPS and {k: vae_settings[k] for k in VAE_OPTIONS} == VAE_OPTIONS
    assert all(k.startswith("vae.decoder.") for k in keys["alice_vae.safetensors"])
    assert {k.split(".")[0] for k in keys["alice.safetensors"]} == {"unet", "adapter"}
    # for core's loaders: the whole finetuned VAE in ldm keys in models/vae; a full subject finetune has no LoRA
    assert sorted(os.listdir(env.models / "vae")) == ["alice_vae.safetensors"]
    assert os.listdir(env.models / "loras") == []
    with safe_open(str(env.models / "vae" / "alice_vae.safetensors"), "pt") as f:
        export, export_keys = f.metadata(), set(f.keys())
    assert (export["format"], export["kind"], export["subject"]) == ("dreampose", "vae_export", "alice_vae.safetensors")
    assert export["cache_key"] == vae["cache_key"]
    assert {"encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight",
            "post_quant_conv.weight"} <= export_keys
    assert not any(k.startswith(("vae.", "first_stage_model.")) for k in export_keys)


def test_second_run_trains_nothing(env, first_run, second_run):
    """Same prompt, fresh host: both finetunes found by cache key → no training step, files untouched,
    the same frames; LoadDreamPose(subject=…) + the reused VAE finetune give them too."""
    assert second_run.returncode == 0, log(second_run)
    training = [e for e in second_run.progress if e["node"] in (SUBJECT_NODE, VAE_NODE, "22")]
    assert training == []
    assert {t["node"] for t in second_run.texts if "0 steps trained" in t["text"]} == {SUBJECT_NODE, VAE_NODE, "22"}
    assert {n: os.stat(env.subjects / n).st_mtime_ns for n in env.subject_files()} == first_run.mtimes
    first = _latent(first_run.out, "ft")
    torch.testing.assert_close(_latent(second_run.out, "ft"), first, rtol=0, atol=0)
    torch.testing.assert_close(_latent(second_run.out, "loaded"), first, rtol=0, atol=0)


def test_input_model_not_changed(first_run, second_run):
    """The base model sampled after both finetunes trained from it (first run) equals the base model
    fresh from disk (second run), and differs from the finetuned one."""
    assert first_run.returncode == 0 and second_run.returncode == 0, log(first_run) + log(second_run)
    order = [e["node"] for e in first_run.progress]
    assert order.index("32") > max(i for i, n in enumerate(order) if n == VAE_NODE)  # really ran afterwards
    base = _latent(first_run.out, "base")
    torch.testing.assert_close(base, _latent(second_run.out, "base"), rtol=0, atol=0)
    assert (base - _latent(first_run.out, "ft")).abs().max() > 1e-3


def test_subject_combo_lists_saved_finetunes(second_run):
    loader = second_run.object_info["LoadDreamPose"]["input"]["required"]
    assert loader["subject"][1]["options"] == ["none", "alice.safetensors", "alice_vae.safetensors"]
    # a subject file is applied on top of weights, never offered as weights or as a VAE; the VAE finetune's
    # export in models/vae is a whole VAE, offered once
    assert not any("alice" in o for o in loader["dreampose_weights"][1]["options"])
    assert [o for o in loader["vae"][1]["options"] if "alice" in o] == ["alice_vae.safetensors"]


def test_cancel_leaves_no_file(env, first_run):
    assert first_run.returncode == 0, log(first_run)
    before = env.subject_files()
    progress = env.root / "cancel-progress.json"
    proc = env.run("cancel", finetune_prompt(name="bob", subject_steps=50), "--progress-log", str(progress),
                   "--interrupt-after", "1")
    assert proc.returncode == 1 and f"INTERRUPTED at node {SUBJECT_NODE} (SubjectFinetune)" in proc.stderr, log(proc)
    events = _events(progress)
    assert [(e["node"], e["value"], e["max"]) for e in events] == [(SUBJECT_NODE, 1, 50)]  # stopped in step 2
    assert env.subject_files() == before  # no bob.safetensors, no temp file
    assert not list(proc.out.glob("ft_*"))


def test_bad_name_rejected_at_queue_time(env):
    proc = env.run("badname", finetune_prompt(name="../escape", vae_name="sub/dir"), execute=False)
    assert proc.returncode == 2, log(proc)
    assert "name '../escape': give a plain file name, without folders" in proc.stderr
    assert "name 'sub/dir': give a plain file name" in proc.stderr


def test_pose_count_mismatch_fails_before_training(env):
    proc = env.run("mismatch", finetune_prompt(name="carol", uv_count=1), "--progress-log",
                   str(env.root / "mismatch.json"))
    assert proc.returncode == 1 and f"EXECUTION ERROR node {SUBJECT_NODE} (SubjectFinetune)" in proc.stderr, log(proc)
    assert "2 subject photo(s) but 1 DensePose UV frame(s)" in proc.stderr
    assert _events(env.root / "mismatch.json") == []
    assert not (env.subjects / "carol.safetensors").exists()


def test_pose_windows_rejected(env):
    prompt = finetune_prompt(name="dave")
    prompt["14"] = node("DensePoseWindow5", uv=["4", 0], width=SIZE, height=SIZE)
    prompt[SUBJECT_NODE]["inputs"]["poses"] = ["14", 0]
    proc = env.run("windows", prompt)
    assert proc.returncode == 1 and f"EXECUTION ERROR node {SUBJECT_NODE} (SubjectFinetune)" in proc.stderr, log(proc)
    assert "already 5-frame windows" in proc.stderr


def test_lora_finetune_then_name_of_the_other_kind_refused(env, second_run):
    """One run: a LoRA subject finetune (rank 4) trains and saves only its delta; then the VAE finetune
    (a new seed: it would train) named like the saved subject finetune is refused before training, and
    that file is kept."""
    assert second_run.returncode == 0, log(second_run)
    before = {n: os.stat(env.subjects / n).st_mtime_ns for n in env.subject_files()}
    prompt = finetune_prompt(name="alice_lora", vae_name="alice", vae_seed=9, vae_options={})  # an older prompt
    prompt[SUBJECT_NODE]["inputs"]["lora_rank"] = 4
    proc = env.run("lora", prompt, "--progress-log", str(env.root / "lora.json"))
    assert proc.returncode == 1 and f"EXECUTION ERROR node {VAE_NODE} (VAEDecoderFinetune)" in proc.stderr, log(proc)
    assert "holds a subject (UNet + adapter) finetune; give this one another name" in proc.stderr
    assert [e["node"] for e in _events(env.root / "lora.json")] == [SUBJECT_NODE] * SUBJECT_STEPS  # VAE: no step
    assert {n: os.stat(env.subjects / n).st_mtime_ns for n in before} == before
    with safe_open(str(env.subjects / "alice_lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert (meta["mode"], meta["lora_rank"], meta["kind"]) == ("lora", "4", "subject")
    assert keys and all(k.startswith(("unet_lora.", "adapter.")) for k in keys)
    assert any(k.endswith(".lora_A") for k in keys)
    with safe_open(str(env.models / "loras" / "alice_lora.safetensors"), "pt") as f:
        export, export_keys = f.metadata(), list(f.keys())
    assert (export["kind"], export["subject"], export["ss_network_dim"]) == ("lora_export", "alice_lora.safetensors",
                                                                           "4")
    assert export_keys and all(k.startswith("lora_unet_") for k in export_keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in export_keys} == \
        {"lora_down", "lora_up", "alpha"}

    # core's own LoraLoaderModelOnly on the base MODEL + the finetuned adapter's condition = the finetuned model
    compose = {k: v for k, v in prompt.items() if k in ("1", "2", "3", "4", "5", SUBJECT_NODE, "9", "10")}
    compose.update({
        "40": node("LoraLoaderModelOnly", model=["1", 1], lora_name="alice_lora.safetensors", strength_model=1.0),
        "41": node("CLIPVAEAdapterEncode", model=[SUBJECT_NODE, 0], image=["2", 0], conditioning_latent="mode",
                   seed=0),
        "42": node("DualCFGSampler", model=[SUBJECT_NODE, 0], cond=["41", 0], poses=["10", 0], s_image=3.0,
                   s_pose=2.0, steps=2, sampler="ddim", seed=5, frames_per_batch=4, start="noise", stretch="none"),
        "43": node("DualCFGSampler", model=["1", 0], cond=["41", 0], poses=["10", 0], s_image=3.0, s_pose=2.0,
                   steps=2, sampler="ddim", seed=5, frames_per_batch=4, start="noise", stretch="none",
                   core_model=["40", 0]),
        "44": node("SaveLatent", samples=["42", 1], filename_prefix="merged"),
        "45": node("SaveLatent", samples=["43", 1], filename_prefix="core_lora"),
    })
    composed = env.run("lora_compose", compose)
    assert composed.returncode == 0, log(composed)
    assert "lora key not loaded" not in composed.stderr, log(composed)      # every key of the file applied
    merged, core_lora = _latent(composed.out, "merged"), _latent(composed.out, "core_lora")
    assert (merged - core_lora).abs().max() <= 1e-5 * merged.abs().max(), (merged - core_lora).abs().max()


# Fresh process: ComfyUI's folder_paths, optionally an extra_model_paths.yaml, then the pack's
# __init__ as ComfyUI imports it; prints where dreampose weights and subject finetunes are looked for.
FOLDER_PROBE = r"""
import importlib.util, json, os, sys
comfy, pack, yaml_path = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, comfy)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths
if yaml_path:
    import utils
    from utils.extra_config import load_extra_path_config
    load_extra_path_config(yaml_path)
spec = importlib.util.spec_from_file_location("DreamPosePack", os.path.join(pack, "__init__.py"),
                                              submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["DreamPosePack"] = module
spec.loader.exec_module(module)
entries = {k: [list(v[0]), sorted(v[1])] for k, v in folder_paths.folder_names_and_paths.items()
           if k.startswith("dreampose")}
print(json.dumps({"models_dir": folder_paths.models_dir, **entries}))
"""


@pytest.mark.parametrize("with_yaml", [False, True])
def test_subject_folder_registered(env, with_yaml):
    """models/dreampose/subjects is a folder_paths type with or without an extra_model_paths.yaml:
    the subjects folder of every dreampose folder, in the same order (so saves go to the first)."""
    proc = subprocess.run([sys.executable, "-c", FOLDER_PROBE, COMFY_DIR, str(ROOT),
                           str(env.yaml) if with_yaml else ""], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    default = os.path.join(got["models_dir"], "dreampose")
    dreampose = [str(env.models / "dreampose"), default] if with_yaml else [default]
    assert got["dreampose"][0] == dreampose
    assert got["dreampose_subjects"] == [[os.path.join(p, "subjects") for p in dreampose], [".safetensors"]]


def test_workflow_validates_and_converts(env, first_run):
    wf = json.loads(WORKFLOW.read_text())
    assert wf["version"] == 0.4
    types = [n["type"] for n in wf["nodes"]]
    assert {"LoadDreamPose", "LoadImage", "DreamPoseLoadUV", "SubjectFinetune", "VAEDecoderFinetune",
            "CLIPVAEAdapterEncode", "DensePoseWindow5", "DualCFGSampler", "SaveAnimatedWEBP"} <= set(types)
    api_path = env.root / "finetune_workflow_api.json"
    check = subprocess.run([sys.executable, str(HOST / "ui_check.py"), str(WORKFLOW), "--object-info",
                            str(env.root / "oi.json"), "--to-api", str(api_path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "0 errors, 0 warnings" in check.stdout, check.stdout + check.stderr
    api = json.loads(api_path.read_text())
    by_type = {}
    for nid, v in api.items():
        by_type.setdefault(v["class_type"], []).append((nid, v["inputs"]))
    (sub_id, sub), = by_type["SubjectFinetune"]
    (vae_id, vae), = by_type["VAEDecoderFinetune"]
    assert {k: sub[k] for k in PAPER_VALUES["SubjectFinetune"]} == {**PAPER_VALUES["SubjectFinetune"],
                                                                     "name": "my_subject"}
    assert {k: vae[k] for k in PAPER_VALUES["VAEDecoderFinetune"]} == {**PAPER_VALUES["VAEDecoderFinetune"],
                                                                       "name": "my_subject_vae"}
    assert vae["model"] == [sub_id, 0]
    (_, sampler), = by_type["DualCFGSampler"]
    assert sampler["model"] == [vae_id, 0]
    (_, save), = by_type["SaveAnimatedWEBP"]
    assert save["images"][0] in {nid for nid, _ in by_type["DualCFGSampler"]}
    proc = env.run("workflow", api, execute=False)
    assert proc.returncode == 0 and "valid; outputs to execute" in proc.stdout, log(proc)
