"""ComfyUI's model management and live previews, in the real host (tests/comfy_host/headless.py).

The DreamPose networks are ComfyUI's to manage: the UNet, CLIP and VAE are core objects, the adapter
has a ModelPatcher of ours; while a prompt runs they are in ``mm.current_loaded_models`` on the load
device, and when the host asks (``unload_all_models``) they go and nothing pins them. Previews come
through ComfyUI's own ``--preview-method`` machinery and do not change the outputs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from host_helpers import COMFY_DIR, POSE_FRAMES, Env, log, node

pytestmark = pytest.mark.host

if COMFY_DIR is None:
    pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh", allow_module_level=True)

WIDTH, HEIGHT, STEPS, FPB = 64, 128, 2, 2


def prompt() -> dict:
    return {
        "1": node("LoadDreamPose", dreampose_weights="tiny_dreampose.safetensors", base_model="none",
                  clip_vision="tiny-clip", vae="from weights or base", dtype="auto", vae_dtype="auto",
                  convention="auto", subject="none"),
        "2": node("LoadImage", image="key_frame.png"),
        "3": node("CLIPVAEAdapterEncode", model=["1", 0], image=["2", 0], conditioning_latent="sample", seed=1),
        "4": node("DreamPoseLoadUV", folder="dreampose_poses", start=0, count=0),
        "5": node("DensePoseWindow5", uv=["4", 0], width=WIDTH, height=HEIGHT),
        "6": node("DualCFGSampler", model=["1", 0], cond=["3", 0], poses=["5", 0], s_image=8.0, s_pose=3.0,
                  steps=STEPS, sampler="ddim", seed=2, frames_per_batch=FPB, start="official", stretch="none"),
        "7": node("SaveImage", images=["6", 0], filename_prefix="frames"),
        "8": node("SaveLatent", samples=["6", 1], filename_prefix="frames"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = Env(tmp_path_factory.mktemp("integration"))
    plain = env.run("plain", prompt(), "--progress-log", str(env.root / "plain.json"),
                    "--mm-log", str(env.root / "plain_mm.json"))
    preview = env.run("preview", prompt(), "--progress-log", str(env.root / "preview.json"),
                      "--preview-method", "latent2rgb")
    return env, plain, preview


def test_models_registered_with_comfy_and_unloadable(runs):
    env, plain, _ = runs
    assert plain.returncode == 0, log(plain)
    state = json.loads((env.root / "plain_mm.json").read_text())
    loaded = {m["module"]: m for m in state["after_prompt"]}
    # the UNet, CLIP and VAE are core's own objects, managed by core's ModelPatcher; only the adapter is ours
    assert sorted(loaded) == ["AutoencoderKL", "CLIPVisionModelProjection", "DreamPoseUNet", "EmbeddingAdapter"], state
    assert len(state["after_prompt"]) == 4, state   # one entry per network, no duplicates
    assert loaded["EmbeddingAdapter"]["patcher"] == "DreamPosePatcher"
    assert {loaded[k]["patcher"] for k in ("AutoencoderKL", "CLIPVisionModelProjection", "DreamPoseUNet")} == \
        {"ModelPatcher"}
    for m in state["after_prompt"]:
        assert m["param_devices"] == [m["load_device"]]
        assert m["model_size"] > 0 and m["loaded_size"] == m["model_size"]  # room enough on the CPU: loaded whole
    assert state["after_unload_all"] == [], state


def test_previews_through_comfy_and_outputs_unchanged(runs):
    env, plain, preview = runs
    assert preview.returncode == 0, log(preview)
    events = [e for e in json.loads((env.root / "preview.json").read_text()) if e["node"] == "6"]
    shown = [e["preview"] for e in events if "preview" in e]
    assert shown and all(fmt == "JPEG" for fmt, _ in shown)
    assert shown[0][1] == [WIDTH // 8, HEIGHT // 8]  # latent2rgb: one pixel per latent
    chunks = -(-POSE_FRAMES // FPB)
    assert [e["value"] for e in events] == list(range(1, chunks * (STEPS + 1) + 1))
    plain_events = [e for e in json.loads((env.root / "plain.json").read_text()) if e["node"] == "6"]
    assert not any("preview" in e for e in plain_events)  # ComfyUI's default: no previews
    # Two processes: CPU kernels (MKL/oneDNN) may take alignment-dependent code paths, so the last bits can
    # differ between runs, and the sampler carries them on (fresh-clone CI runs: 4.8e-5 on latents up to 28,
    # i.e. 2e-6 of their scale). A preview that touched sampling (a generator draw, an in-place write)
    # changes them by orders of magnitude more than this bound: 1e-5 of the largest latent.
    a = load_file(next(plain.out.glob("frames_*.latent")))["latent_tensor"]
    b = load_file(next(preview.out.glob("frames_*.latent")))["latent_tensor"]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max(), ((a - b).abs().max(), a.abs().max())
    for pa, pb in zip(sorted(plain.out.glob("frames_*.png")), sorted(preview.out.glob("frames_*.png")), strict=True):
        diff = np.abs(np.asarray(Image.open(pa)).astype(int) - np.asarray(Image.open(pb)).astype(int))
        assert diff.max() <= 1, diff.max()   # at most a rounding step of 8-bit output
