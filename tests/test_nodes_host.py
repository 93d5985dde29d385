"""The nodes inside a real ComfyUI 0.3.75 host (tests/comfy_host/headless.py), on the CPU.

Tiny random models of the real classes are written in ComfyUI's folder layout and handed to the
host through an extra_model_paths.yaml, as a user would (tests/host_helpers.py). Each host run is a
fresh process: ComfyUI imports the pack exactly as it would from custom_nodes/.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from host_helpers import COMFY_DIR, HOST, POSE_FRAMES, ROOT, Env, log as _log, node, object_info_checks  # noqa: E402
from dreampose.loaders.load import load_dreampose  # noqa: E402
from dreampose.pipeline.conditioning import encode_image_condition  # noqa: E402
from dreampose.pipeline.poses import load_uv_folder, make_pose_windows  # noqa: E402
from dreampose.pipeline.sampling import decode, sample  # noqa: E402
from dreampose.settings import SAMPLERS, START_MODES, STRETCH_MODES, VAE_SCALE, SamplingOptions  # noqa: E402

pytestmark = pytest.mark.host

WORKFLOW = ROOT / "workflows" / "dreampose_animate.json"

# Saved workflows store widget values by position: this order is a promise to users.
INPUT_ORDER = {
    "LoadDreamPose": ["dreampose_weights", "base_model", "clip_vision", "vae", "dtype", "vae_dtype", "convention",
                      "subject"],
    "CLIPVAEAdapterEncode": ["model", "image", "conditioning_latent", "seed"],
    "DreamPoseLoadUV": ["folder", "start", "count"],
    "DensePoseWindow5": ["uv", "width", "height", "first_frame", "frame_count", "uv_smoothing"],
    "DualCFGSampler": ["model", "cond", "poses", "s_image", "s_pose", "steps", "sampler", "seed",
                       "frames_per_batch", "start", "stretch", "core_sampler", "scheduler", "core_model",
                       "guidance_start", "guidance_end", "preset", "reference_attention", "cross_frame_attention",
                       "cross_frame_anchor"],
    "DreamPoseApplyPose": ["image", "null", "poses", "start", "seed", "vae", "key_frame"],
}
OUTPUTS = {
    "LoadDreamPose": ["DREAMPOSE_MODEL", "MODEL", "CLIP_VISION", "VAE"],
    "CLIPVAEAdapterEncode": ["DREAMPOSE_COND", "CONDITIONING", "CONDITIONING"],
    "DreamPoseLoadUV": ["DREAMPOSE_POSE"], "DensePoseWindow5": ["DREAMPOSE_POSE"],
    "DualCFGSampler": ["IMAGE", "LATENT"],
    "DreamPoseApplyPose": ["CONDITIONING", "CONDITIONING", "CONDITIONING", "LATENT"],
}

# the main prompt: sizes and seeds the library-side check below repeats
WIDTH, HEIGHT, STEPS, FPB = 128, 192, 2, 2
FRAMES = POSE_FRAMES
ENCODE_SEED, SAMPLE_SEED = 7, 11

if COMFY_DIR is None:
    pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh (scripts/test.sh does)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def host_env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("host"))


def animate_prompt(width=WIDTH, height=HEIGHT, steps=STEPS, folder="dreampose_poses") -> dict:
    """LoadImage + our chain → SaveImage / SaveLatent; a second chain builds a fresh model from base."""
    return {
        "1": node("LoadDreamPose", dreampose_weights="tiny_dreampose.safetensors", base_model="none",
                  clip_vision="tiny-clip", vae="from weights or base", dtype="auto", vae_dtype="auto",
                  convention="auto", subject="none"),
        "2": node("LoadImage", image="key_frame.png"),
        "3": node("CLIPVAEAdapterEncode", model=["1", 0], image=["2", 0], conditioning_latent="sample",
                  seed=ENCODE_SEED),
        "4": node("DreamPoseLoadUV", folder=folder, start=0, count=0),
        "5": node("DensePoseWindow5", uv=["4", 0], width=width, height=height),
        "6": node("DualCFGSampler", model=["1", 0], cond=["3", 0], poses=["5", 0], s_image=8.0, s_pose=3.0,
                  steps=steps, sampler="ddim", seed=SAMPLE_SEED, frames_per_batch=FPB, start="official",
                  stretch="none"),
        "7": node("SaveImage", images=["6", 0], filename_prefix="animate"),
        "8": node("SaveLatent", samples=["6", 1], filename_prefix="animate"),
    }


def fresh_chain() -> dict:
    return {
        "11": node("LoadDreamPose", dreampose_weights="none (fresh from base)", base_model="tiny-sd",
                   clip_vision="tiny-clip", vae="from weights or base", dtype="fp32", vae_dtype="fp32",
                   convention="auto", subject="none"),
        "12": node("CLIPVAEAdapterEncode", model=["11", 0], image=["2", 0], conditioning_latent="mode", seed=0),
        "13": node("DualCFGSampler", model=["11", 0], cond=["12", 0], poses=["5", 0], s_image=2.0, s_pose=1.0,
                   steps=2, sampler="dpmpp_2m", seed=3, frames_per_batch=4, start="noise", stretch="per_frame"),
        "14": node("SaveImage", images=["13", 0], filename_prefix="fresh"),
    }


@pytest.fixture(scope="module")
def main_run(host_env):
    """One host process: /object_info, then both chains executed, progress recorded."""
    oi = host_env.root / "oi.json"
    proc = host_env.run("main", {**animate_prompt(), **fresh_chain()}, "--object-info", str(oi),
                        "--progress-log", str(host_env.root / "progress.json"))
    proc.object_info = json.loads(oi.read_text()) if oi.exists() else {}
    return proc


def test_init_is_v3_entrypoint_only():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    names = {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    funcs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert "NODE_CLASS_MAPPINGS" not in names  # ComfyUI would ignore comfy_entrypoint (V1 wins)
    assert "comfy_entrypoint" in funcs


def test_pack_imports_with_full_schema(main_run):
    assert "CUSTOM NODE IMPORT FAILED" not in main_run.stderr, _log(main_run)
    assert "There are modules in" not in main_run.stderr  # no diffusers dtype-cast warning spam
    oi = main_run.object_info
    object_info_checks(oi, INPUT_ORDER, OUTPUTS)
    sampler = oi["DualCFGSampler"]["input"]["required"]
    assert sampler["sampler"][1]["options"] == list(SAMPLERS) and sampler["sampler"][1]["default"] == "dpmpp_2m"
    assert sampler["start"][1]["options"] == list(START_MODES)
    assert sampler["stretch"][1]["options"] == list(STRETCH_MODES) and sampler["stretch"][1]["default"] == "none"
    assert [sampler[k][1]["default"] for k in ("s_image", "s_pose", "steps", "frames_per_batch")] == [8.0, 3.0, 10, 4]
    window = oi["DensePoseWindow5"]["input"]["required"]
    assert (window["width"][1]["default"], window["height"][1]["default"], window["width"][1]["step"]) == (512, 640, 64)


def test_model_folders_from_extra_model_paths(main_run):
    """The yaml's dreampose entry is extended (its files listed, non-weights filtered), folder
    models are listed once as folders, and authors' companion files are not offered as weights."""
    loader = {k: v[1]["options"] for k, v in main_run.object_info["LoadDreamPose"]["input"]["required"].items()}
    assert loader["dreampose_weights"] == ["tiny_dreampose.safetensors", "unet_epoch_20.pth", "none (fresh from base)"]
    assert loader["base_model"] == ["none", "v1-5-pruned-emaonly-fp16.safetensors", "tiny-sd"]
    assert loader["clip_vision"] == ["clip-vit-base-patch32.safetensors", "tiny-clip"]
    assert loader["vae"] == ["from weights or base", "vae_20.pth [dreampose]"]
    assert loader["dtype"] == ["auto", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    assert loader["vae_dtype"] == ["auto", "fp32", "bf16", "fp16"]
    assert loader["convention"] == ["auto", "official", "standard"]
    assert loader["subject"] == ["none"]  # no finetunes saved yet (tests/test_finetune_nodes.py lists some)


def test_animate_prompt_runs_to_frames(main_run):
    assert main_run.returncode == 0, _log(main_run)
    pngs = sorted(main_run.out.glob("animate_*.png"))
    assert len(pngs) == FRAMES
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (WIDTH, HEIGHT) and im.mode == "RGB"
    latent = load_file(next(main_run.out.glob("animate_*.latent")))["latent_tensor"]
    assert tuple(latent.shape) == (FRAMES, 4, HEIGHT // 8, WIDTH // 8)
    fresh = sorted(main_run.out.glob("fresh_*.png"))
    assert len(fresh) == FRAMES
    for p in fresh:  # stretch=per_frame maps every frame to the full 0..255 range
        arr = np.asarray(Image.open(p))
        assert arr.shape == (HEIGHT, WIDTH, 3) and arr.min() == 0 and arr.max() == 255


def test_node_output_equals_library(main_run, host_env):
    """The nodes pass every setting through: the host's latents equal a direct library run."""
    assert main_run.returncode == 0, _log(main_run)
    model = load_dreampose(clip=host_env.clip, dreampose=host_env.weights)
    key = torch.from_numpy(np.asarray(Image.open(host_env.key_frame).convert("RGB")).copy()).permute(2, 0, 1)
    with torch.inference_mode():
        cond = encode_image_condition(model, key, latent_mode="sample",
                                      generator=torch.Generator().manual_seed(ENCODE_SEED))
        windows = make_pose_windows(load_uv_folder(str(host_env.poses)), height=HEIGHT, width=WIDTH)
        options = SamplingOptions(width=WIDTH, height=HEIGHT, steps=STEPS, sampler="ddim", s_image=8.0, s_pose=3.0,
                                  start="official", frames_per_batch=FPB)
        want = sample(model, cond, windows, options, generator=torch.Generator().manual_seed(SAMPLE_SEED))
        frames = decode(model, want, batch_size=4)
    got = load_file(next(main_run.out.glob("animate_*.latent")))["latent_tensor"]
    # the UNet evaluated by core's code (its attention and conv kernels) against diffusers', the DDIM steps the
    # library's: measured 1.05e-4 on latents up to 42 (2.5e-6 of their scale) after two steps
    diff, scale = (got - want / VAE_SCALE).abs().max().item(), (want / VAE_SCALE).abs().max().item()
    assert diff <= 1e-5 * max(1.0, scale), (diff, scale)
    first = np.asarray(Image.open(sorted(main_run.out.glob("animate_*.png"))[0])).astype(int)
    assert np.abs(first - (frames[0].numpy() * 255).round().astype(int)).max() <= 1


def test_progress_every_step(main_run, host_env):
    """One progress update per denoising step per chunk, then per decode batch, ending full."""
    assert main_run.returncode == 0, _log(main_run)
    events = [e for e in json.loads((host_env.root / "progress.json").read_text()) if e["node"] == "6"]
    chunks = -(-FRAMES // FPB)
    assert len(events) == chunks * STEPS + chunks
    assert [e["value"] for e in events] == list(range(1, len(events) + 1))
    assert {e["max"] for e in events} == {len(events)}


def test_cancel_stops_within_one_step(host_env):
    proc = host_env.run("cancel", animate_prompt(steps=5), "--progress-log", str(host_env.root / "cancel.json"),
                   "--interrupt-after", "2")
    assert proc.returncode == 1 and "INTERRUPTED at node 6" in proc.stderr, _log(proc)
    events = json.loads((host_env.root / "cancel.json").read_text())
    assert len(events) == 2 and events[-1]["value"] == 2 and events[-1]["max"] > 2
    assert not list(proc.out.glob("animate_*"))


def test_bad_sizes_and_folder_rejected_at_queue_time(host_env):
    proc = host_env.run("invalid", animate_prompt(width=100, folder="no_such_folder"), execute=False)
    assert proc.returncode == 2, _log(proc)
    assert "output size 100×192 (W×H) is not a multiple of 64" in proc.stderr
    assert "pose folder not found" in proc.stderr and "no_such_folder" in proc.stderr


def test_rgba_key_frame_fails_clearly(host_env):
    prompt = animate_prompt()
    prompt["20"] = node("JoinImageWithAlpha", image=["2", 0], alpha=["2", 1])
    prompt["3"]["inputs"]["image"] = ["20", 0]
    proc = host_env.run("rgba", prompt)
    assert proc.returncode == 1, _log(proc)
    assert "EXECUTION ERROR node 3 (CLIPVAEAdapterEncode)" in proc.stderr
    assert "RGBA" in proc.stderr and "Split Image with Alpha" in proc.stderr


def test_workflow_validates_and_converts(main_run, host_env):
    wf = json.loads(WORKFLOW.read_text())
    assert wf["version"] == 0.4
    types = {n["type"] for n in wf["nodes"]}
    assert set(INPUT_ORDER) - {"DreamPoseApplyPose"} <= types and {"LoadImage", "SaveAnimatedWEBP"} <= types
    loader = next(n for n in wf["nodes"] if n["type"] == "LoadDreamPose")
    assert loader["properties"]["Node name for S&R"] == "LoadDreamPose"
    for m in loader["properties"]["models"]:
        assert m["name"] in loader["widgets_values"] and m["url"].startswith("https://") and m["directory"]

    api_path = host_env.root / "workflow_api.json"
    check = subprocess.run([sys.executable, str(HOST / "ui_check.py"), str(WORKFLOW), "--object-info",
                            str(host_env.root / "oi.json"), "--to-api", str(api_path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "0 errors, 0 warnings" in check.stdout, check.stdout + check.stderr
    api = json.loads(api_path.read_text())
    by_type = {v["class_type"]: v["inputs"] for v in api.values()}
    assert by_type["DensePoseWindow5"]["width"] == 512 and by_type["DensePoseWindow5"]["height"] == 640
    assert by_type["DualCFGSampler"]["s_image"] == 8.0 and by_type["DualCFGSampler"]["sampler"] == "pndm"
    proc = host_env.run("workflow", api, execute=False)
    assert proc.returncode == 0 and "valid; outputs to execute" in proc.stdout, _log(proc)


# Runs in a fresh process (ComfyUI's model_management picks its device at import): fakes what
# ComfyUI says about the device and prints what nodes/device.py chooses for "auto".
DTYPE_PROBE = r"""
import importlib.util, json, sys
comfy, device_py = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import os
import torch
import comfy.model_management as mm
import folder_paths  # noqa: F401  (the pack registers its model folders when imported)
pack = os.path.dirname(os.path.dirname(device_py))   # nodes/device.py imports the library: load the pack as a package
spec = importlib.util.spec_from_file_location("dreampose_pack", os.path.join(pack, "__init__.py"),
                                              submodule_search_locations=[pack])
sys.modules["dreampose_pack"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["dreampose_pack"])
import importlib
dev = importlib.import_module("dreampose_pack.nodes.device")
name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
cpu, out = torch.device("cpu"), {}
for fp16, bf16, vae in [(True, True, torch.float16), (False, True, torch.float32), (False, False, torch.float32),
                        (True, False, torch.float16)]:
    mm.should_use_fp16 = lambda *a, _v=fp16, **k: _v
    mm.should_use_bf16 = lambda *a, _v=bf16, **k: _v
    mm.vae_dtype = lambda *a, _v=vae, **k: _v  # float16 here = what --fp16-vae makes ComfyUI answer
    out[f"{fp16},{bf16},{vae}"] = [name(dev.unet_dtype("auto", cpu, 10)), name(dev.vae_dtype("auto", cpu))]
out["explicit"] = [name(dev.unet_dtype("bf16", cpu, 10)), name(dev.vae_dtype("fp16", cpu))]
print(json.dumps(out))
"""


def test_auto_dtypes_follow_comfy_and_never_fp16_vae():
    """``auto`` takes fp16, else bf16, else fp32 as ComfyUI judges the device; the VAE never gets fp16."""
    proc = subprocess.run([sys.executable, "-c", DTYPE_PROBE, COMFY_DIR, str(ROOT / "nodes" / "device.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "True,True,torch.float16": ["float16", "bfloat16"],
        "False,True,torch.float32": ["bfloat16", "float32"],
        "False,False,torch.float32": ["float32", "float32"],
        "True,False,torch.float16": ["float16", "float32"],
        "explicit": ["bfloat16", "float16"],
    }
