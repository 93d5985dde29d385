"""Every shipped workflow (workflows/*.json, UI format) in the real ComfyUI 0.3.75 host, on the CPU.

Parametrised over the files, so a new workflow is tested without touching this file: it must
validate against the host's /object_info with tests/comfy_host/ui_check.py (node types, widget
counts and ranges, link types; no warnings, since the test host holds every file the workflows
name), convert to API format as the frontend does (ui_check --to-api), and that prompt must
EXECUTE with tiny models (model names swapped to the tiny ones, tiny sizes and steps), every
SaveAnimatedWEBP writing its file. DensePose runs the tiny fake TorchScript export of
tests/test_densepose.py; the driving video is a tiny MP4 written with PyAV.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from host_helpers import COMFY_DIR, HOST, ROOT, Env, log, write_uv_folder

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")  # the fake DensePose export

WORKFLOW_DIR = ROOT / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
VIDEO = "driving_video.mp4"
DENSEPOSE_FILE = "densepose_r50_fpn_dl.torchscript"   # the name the workflows use
VIDEO_FRAMES = 3

# tiny models / sizes / steps for execution, by node type (only inputs the node has are touched)
TINY = {
    "LoadDreamPose": {"dreampose_weights": "tiny_dreampose.safetensors", "base_model": "none",
                      "clip_vision": "tiny-clip"},
    "DensePoseWindow5": {"width": 64, "height": 64},
    "DualCFGSampler": {"steps": 2, "sampler": "ddim", "frames_per_batch": 2},
    "SubjectFinetune": {"steps": 1},
    "VAEDecoderFinetune": {"steps": 1},
    "DreamPoseDensePose": {"detect_resolution": 64, "frames_per_batch": 2},
    "BasicScheduler": {"steps": 2},
}
LORA_FILE = "my_subject.safetensors"   # the subject LoRA the native-sampling workflow loads


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- files (no host)

@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_file_shape(path):
    """UI format 0.4 as the frontend saves it, a thumbnail beside it, a Markdown note, model links."""
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    assert wf["last_node_id"] >= max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] >= max((lk[0] for lk in wf["links"]), default=0)
    # the frontend (1.32) shows a pack template's thumbnail from /api/workflow_templates/<pack>/<name>.jpg
    assert path.with_suffix(".jpg").exists(), f"{path.name} has no thumbnail"
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert notes and "models/" in notes[0]["widgets_values"][0], "a Markdown note says where weights go"
    for n in wf["nodes"]:
        for m in n.get("properties", {}).get("models", []):
            assert set(m) == {"name", "url", "directory"} and m["url"].startswith("https://")
            assert m["name"] in n["widgets_values"], (n["type"], m["name"])
        if n["type"] in ("LoadDreamPose", "DreamPoseDensePose"):
            assert n["properties"]["Node name for S&R"] == n["type"]
    if path.stem == "dreampose_demo":   # the shipped demo model: nothing to download, no input files
        types = {n["type"] for n in wf["nodes"]}
        assert "DreamPoseDemoModel" in types and not types & {"LoadDreamPose", "LoadImage", "LoadVideo"}
        assert not any(n.get("properties", {}).get("models") for n in wf["nodes"])
    else:
        assert any(n["type"] == "LoadDreamPose" and n["properties"].get("models") for n in wf["nodes"])


def test_the_issue_workflows_are_shipped():
    names = {p.name for p in WORKFLOWS}
    assert {"dreampose_animate.json", "dreampose_finetune_animate.json", "dreampose_video_to_animation.json",
            "dreampose_guidance_sweep.json", "dreampose_demo.json", "dreampose_native_sampling.json"} <= names


def test_demo_workflow_finetunes_the_key_frame_as_the_demo_command_does():
    """The demo graph's VAE decoder finetune: the demo's steps, lr, L1 loss and 0.6 blend (settings.py)."""
    from dreampose.settings import DEMO_DECODER_BLEND, DEMO_DECODER_LOSS, DEMO_FINETUNE_LR, DEMO_VAE_FINETUNE_STEPS
    (vae,) = [n for n in load(WORKFLOW_DIR / "dreampose_demo.json")["nodes"] if n["type"] == "VAEDecoderFinetune"]
    # name, steps, lr, seed, crop, flip, precision, decoder_loss, decoder_blend
    values = vae["widgets_values"]
    assert values[1:3] == [DEMO_VAE_FINETUNE_STEPS, DEMO_FINETUNE_LR]
    assert values[-2:] == [DEMO_DECODER_LOSS, DEMO_DECODER_BLEND] == ["l1", 0.6]


def test_native_workflow_is_core_sampling_with_dreamposes_guidance():
    """DreamPose's parts feed core's sampling: a LoRA on the MODEL, DualCFGGuider with the paper's scales
    in the right slots (cfg_conds = s_pose 3, cfg_cond2_negative = s_image 8, regular), core VAE Decode."""
    wf = load(WORKFLOW_DIR / "dreampose_native_sampling.json")
    nodes = {n["id"]: n for n in wf["nodes"]}
    by_type = {n["type"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}

    def source(node_type: str, input_name: str) -> tuple[str, int]:
        inp = next(i for i in by_type[node_type]["inputs"] if i["name"] == input_name)
        _, origin, slot, *_ = links[inp["link"]]
        return nodes[origin]["type"], slot

    assert by_type["DualCFGGuider"]["widgets_values"] == [3.0, 8.0, "regular"]
    assert source("LoraLoaderModelOnly", "model") == ("LoadDreamPose", 1)          # the core MODEL output
    assert source("DualCFGGuider", "model") == ("LoraLoaderModelOnly", 0)
    assert [source("DualCFGGuider", k) for k in ("cond1", "cond2", "negative")] == [
        ("DreamPoseApplyPose", 0), ("DreamPoseApplyPose", 1), ("DreamPoseApplyPose", 2)]
    assert source("SamplerCustomAdvanced", "latent_image") == ("DreamPoseApplyPose", 3)
    assert source("VAEDecode", "vae") == ("LoadDreamPose", 3)
    assert {source("DreamPoseApplyPose", k) for k in ("image", "null")} == {("CLIPVAEAdapterEncode", 1),
                                                                             ("CLIPVAEAdapterEncode", 2)}


def test_video_workflow_runs_densepose_on_the_video_and_the_photo():
    wf = load(WORKFLOW_DIR / "dreampose_video_to_animation.json")
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}

    def source(node, name):
        inp = next(i for i in node["inputs"] if i["name"] == name)
        return nodes[links[inp["link"]][1]]

    by_type = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    assert len(by_type["DreamPoseDensePose"]) == 2
    sub, = by_type["SubjectFinetune"]
    assert source(source(sub, "poses"), "images")["type"] == "LoadImage"
    assert source(sub, "images")["type"] == "LoadImage"
    win, = by_type["DensePoseWindow5"]
    assert source(source(source(win, "uv"), "images"), "video")["type"] == "LoadVideo"
    samp, = by_type["DualCFGSampler"]
    assert source(samp, "model")["type"] == "VAEDecoderFinetune"
    save, = by_type["SaveAnimatedWEBP"]
    assert source(save, "images") is samp and source(save, "fps")["type"] == "GetVideoComponents"


def test_sweep_workflow_is_a_grid_of_guidance_settings():
    wf = load(WORKFLOW_DIR / "dreampose_guidance_sweep.json")
    samplers = [n for n in wf["nodes"] if n["type"] == "DualCFGSampler"]
    settings = {(n["widgets_values"][0], n["widgets_values"][1]) for n in samplers}
    s_image = {a for a, _ in settings}
    s_pose = {b for _, b in settings}
    assert len(s_image) >= 3 and len(s_pose) >= 3 and settings == {(a, b) for a in s_image for b in s_pose}
    assert s_image | s_pose <= {0.0, 3.0, 5.0, 7.0, 9.0}
    assert len({tuple(n["widgets_values"][2:]) for n in samplers}) == 1, "only guidance differs"
    prefixes = {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "SaveAnimatedWEBP"}
    for a, b in settings:
        assert f"dreampose_sweep/si{a:g}_sp{b:g}" in prefixes


# ---------------------------------------------------------------------------------------------- in the host

def write_video(path: Path, frames: int = VIDEO_FRAMES, size=(64, 48)) -> None:
    import av
    rng = np.random.default_rng(3)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def wf_env(tmp_path_factory):
    if COMFY_DIR is None:
        pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh (scripts/test.sh does)")
    from test_densepose import REL_BOX, FakeExport, person_a, save_script, stack
    env = Env(tmp_path_factory.mktemp("workflows"))
    # every file the shipped workflows name, so validation has nothing to warn about
    for name in ("unet_epoch_20.pth",):
        assert (env.models / "dreampose" / name).exists()
    (env.models / "densepose").mkdir()
    fake = FakeExport(torch.tensor([REL_BOX]), *stack(person_a()), relative=True, shift=False)
    save_script(fake, env.models / "densepose" / DENSEPOSE_FILE)
    env.yaml.write_text(env.yaml.read_text() + "  densepose: densepose\n")
    write_uv_folder(env.input / "dreampose_subject_uv", 1, seed=6)
    write_tiny_lora(env.models / "loras" / LORA_FILE)
    write_video(env.input / VIDEO)
    oi_path = env.root / "oi.json"
    proc = env.run("object-info", None, "--object-info", str(oi_path))
    assert proc.returncode == 0, log(proc)
    env.oi_path = oi_path
    return env


def write_tiny_lora(path: Path) -> None:
    """A rank-2 kohya LoRA of every attention projection of the tiny test UNet (what SubjectFinetune exports)."""
    from safetensors.torch import save_file

    from dreampose.demo.tiny import tiny_dreampose
    from dreampose.models.lora import LORA_TARGETS, LoraDelta, kohya_state

    unet = tiny_dreampose(seed=0, core=True).unet
    g = torch.Generator().manual_seed(8)
    factors = {name: (torch.randn(2, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, 2, generator=g))
               for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS)}
    save_file(kohya_state(LoraDelta(factors, 2, 2.0, [], "")), str(path))


def tiny(api: dict, stem: str) -> dict:
    for v in api.values():
        for key, value in TINY.get(v["class_type"], {}).items():
            if key in v["inputs"]:
                v["inputs"][key] = value
        if v["class_type"] in ("SubjectFinetune", "VAEDecoderFinetune"):
            v["inputs"]["name"] = f"{stem}_{v['inputs']['name']}"  # one finetune per workflow
    return api


@pytest.mark.host
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_converts_and_executes(wf_env, path):
    api_path = wf_env.root / f"{path.stem}_api.json"
    check = subprocess.run([sys.executable, str(HOST / "ui_check.py"), str(path), "--object-info",
                            str(wf_env.oi_path), "--to-api", str(api_path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "0 errors, 0 warnings" in check.stdout, check.stdout + check.stderr
    api = load(api_path)
    ui_types = {n["type"] for n in load(path)["nodes"]} - {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}
    assert {v["class_type"] for v in api.values()} == ui_types
    proc = wf_env.run(path.stem, tiny(api, path.stem))
    assert proc.returncode == 0 and "valid; outputs to execute" in proc.stdout, log(proc)
    saves = [v for v in api.values() if v["class_type"] == "SaveAnimatedWEBP"]
    written = sorted(proc.out.rglob("*.webp"))
    assert len(written) == len(saves), (written, log(proc))
    for v in saves:
        prefix = Path(v["inputs"]["filename_prefix"])
        assert any(w.parent == proc.out / prefix.parent and w.name.startswith(prefix.name) for w in written), prefix
