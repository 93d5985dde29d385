#!/usr/bin/env python3
"""Writes the generated example workflows (UI format, version 0.4, what the frontend saves) in workflows/.

  python scripts/build_workflows.py OBJECT_INFO.json [NAME.json ...]

Sockets, widget order and defaults come from the host's /object_info (tests/comfy_host/headless.py
--object-info writes one), so a saved graph matches what the frontend would build. Only the
workflows listed in WORKFLOWS are generated; the others in workflows/ are hand-made.
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
               "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints"}
CLIP = {"name": "clip-vit-base-patch32.safetensors",
        "url": "https://huggingface.co/openai/clip-vit-base-patch32/resolve/main/model.safetensors",
        "directory": "clip_vision"}
DENSEPOSE = {"name": "densepose_r50_fpn_dl.torchscript",
             "url": "https://huggingface.co/LayerNorm/DensePose-TorchScript-with-hint-image/resolve/main/"
                    "densepose_r50_fpn_dl.torchscript", "directory": "densepose"}
LOADER = ["unet_epoch_20.pth", SD15["name"], CLIP["name"], "from weights or base", "auto", "auto", "auto", "none"]


class Graph:
    def __init__(self, oi: dict):
        self.oi, self.nodes, self.links = oi, [], []

    def add(self, type_: str, pos, values=None, title=None, models=None, widget_inputs=(), size=None) -> dict:
        """A node with the host's sockets; ``values`` are widgets_values (defaults where None)."""
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": [320, 100], "flags": {},
             "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {}}
        if type_ == "MarkdownNote":
            n["widgets_values"] = values
        else:
            info = self.oi[type_]
            widgets = 0
            for group in ("required", "optional"):
                for name in info.get("input_order", {}).get(group, []):
                    spec = info["input"][group][name]
                    typ = "COMBO" if isinstance(spec[0], list) else spec[0]
                    if typ in WIDGETS:
                        widgets += 1
                        if name in widget_inputs:
                            n["inputs"].append({"name": name, "type": typ, "widget": {"name": name}, "link": None})
                    else:
                        n["inputs"].append({"name": name, "type": typ, "link": None})
            names = info.get("output_name") or info["output"]
            n["outputs"] = [{"name": nm, "type": t, "links": None} for nm, t in zip(names, info["output"])]
            n["properties"]["Node name for S&R"] = type_
            if models:
                n["properties"]["models"] = models
            n["widgets_values"] = values or []
            sockets = max(len([i for i in n["inputs"] if "widget" not in i]), len(n["outputs"]))
            n["size"] = [340, 46 + 22 * sockets + 26 * widgets + (260 if type_ in ("LoadImage", "LoadVideo") else 0)]
        if title:
            n["title"] = title
        if size:
            n["size"] = list(size)
        self.nodes.append(n)
        return n

    def link(self, src: dict, slot: int, dst: dict, name: str) -> None:
        lid = len(self.links) + 1
        typ = src["outputs"][slot]["type"]
        inp = next(i for i in dst["inputs"] if i["name"] == name)
        inp["link"] = lid
        src["outputs"][slot]["links"] = (src["outputs"][slot]["links"] or []) + [lid]
        self.links.append([lid, src["id"], slot, dst["id"], dst["inputs"].index(inp), typ])

    def save(self, path: Path, seed: str) -> None:
        wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, seed)), "revision": 0, "last_node_id": len(self.nodes),
              "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
              "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [80, 420]}}, "version": 0.4}
        path.write_text(json.dumps(wf, indent=2, ensure_ascii=False) + "\n")


VIDEO_NOTE = """## DreamPose: from a video to an animation

1. **Models**: DreamPose weights (`unet_epoch_20.pth` + `adapter_20.pth`, Google Drive link in \
https://github.com/johannakarras/DreamPose) → `models/dreampose/`; Stable Diffusion 1.x → `models/checkpoints/`; CLIP \
ViT-B/32 → `models/clip_vision/`; a DensePose TorchScript export (`densepose_r50_fpn_dl.torchscript`) → \
`models/densepose/` (comfyui_controlnet_aux's downloaded copy is found too). The loaders' download links give the files.
2. **Subject photo** (*Load Image*): full body, portrait 4:5, plain background.
3. **Driving video** (*Load Video*): one person moving; its frames go through **DensePose** to a UV sequence. A second \
**DensePose** turns the photo into the pose that the finetune pairs with it.
4. **Subject Finetune** (500 steps) and **VAE Decoder Finetune** (1500 steps) adapt the model to this person; both are \
saved in `models/dreampose/subjects/` and reused next time when nothing changed.
5. **Encode Key Frame** → **Pose Windows** (512×640) → **Dual-CFG Sampler** (s_image 8, s_pose 3, 100 PNDM steps) → an \
animated WEBP at the video's frame rate.

Check the DensePose previews first: a wrong person, or BGR/RGB mix-ups, show there. Long videos: trim them in \
*Load Video*'s file or set DreamPose's `frames_per_batch` lower for VRAM."""

SWEEP_NOTE = """## DreamPose: guidance sweep (s_image × s_pose)

The paper's sweep of the two guidance scales (official values s ∈ {0, 3, 5, 7, 9}); here a 3×3 subset, s_image ∈ \
{3, 5, 7} (rows) × s_pose ∈ {3, 5, 7} (columns). All samplers share one model, one key-frame encoding, one pose \
sequence and one seed, so only guidance changes.

- **Models** as in *dreampose_animate*: DreamPose weights in `models/dreampose/`, Stable Diffusion 1.x in \
`models/checkpoints/`, CLIP ViT-B/32 in `models/clip_vision/`; poses (`frame_N_densepose.npy`) in \
`input/dreampose_poses/`.
- Each setting is saved as `dreampose_sweep/si<S_IMAGE>_sp<S_POSE>` (an animated WEBP); **Grid** stitches the nine \
into one animated grid (rows s_image, columns s_pose).
- Nine samplings take nine times as long: try few frames (*Load DensePose UV* `count`) and fewer steps first. Add a \
row or column by copying a sampler and setting its two scales."""


def video_to_animation(oi: dict) -> Graph:
    g = Graph(oi)
    note = g.add("MarkdownNote", (40, -430), [VIDEO_NOTE], title="Read me", size=[900, 400])
    del note
    video = g.add("LoadVideo", (40, 40), ["driving_video.mp4", "image"], title="Driving video")
    comps = g.add("GetVideoComponents", (40, 460))
    photo = g.add("LoadImage", (40, 620), ["key_frame.png", "image"], title="Subject photo")
    dp_video = g.add("DreamPoseDensePose", (420, 40), [DENSEPOSE["name"], "largest", 8, 800], models=[DENSEPOSE],
                     title="DensePose of the video")
    dp_photo = g.add("DreamPoseDensePose", (420, 620), [DENSEPOSE["name"], "largest", 8, 800],
                     title="DensePose of the photo")
    prev_video = g.add("PreviewImage", (420, 260), size=[320, 300], title="Video poses")
    loader = g.add("LoadDreamPose", (800, 620), list(LOADER), models=[SD15, CLIP])
    sub = g.add("SubjectFinetune", (1180, 620), ["my_subject", 500, 1e-05, 0, True, False, False, "fp32", "adamw", 0])
    vae = g.add("VAEDecoderFinetune", (1560, 620),
                ["my_subject_vae", 1500, 5e-05, 0, True, False, "fp32", "mse", 1.0])
    enc = g.add("CLIPVAEAdapterEncode", (1940, 620), ["sample", 0, "fixed"])
    win = g.add("DensePoseWindow5", (1180, 40), [512, 640])
    samp = g.add("DualCFGSampler", (2320, 300), [8.0, 3.0, 100, "pndm", 0, "fixed", 4, "official", "none"])
    save = g.add("SaveAnimatedWEBP", (2700, 300), ["DreamPose_video", 12.0, False, 90, "default"],
                 widget_inputs=("fps",), size=[420, 560])
    g.link(video, 0, comps, "video")
    g.link(comps, 0, dp_video, "images")
    g.link(photo, 0, dp_photo, "images")
    g.link(dp_video, 1, prev_video, "images")
    g.link(dp_video, 0, win, "uv")
    g.link(loader, 0, sub, "model")
    g.link(photo, 0, sub, "images")
    g.link(dp_photo, 0, sub, "poses")
    g.link(sub, 0, vae, "model")
    g.link(photo, 0, vae, "images")
    g.link(vae, 0, enc, "model")
    g.link(photo, 0, enc, "image")
    g.link(vae, 0, samp, "model")
    g.link(enc, 0, samp, "cond")
    g.link(win, 0, samp, "poses")
    g.link(samp, 0, save, "images")
    g.link(comps, 2, save, "fps")
    return g


SWEEP = (3.0, 5.0, 7.0)


def guidance_sweep(oi: dict) -> Graph:
    g = Graph(oi)
    g.add("MarkdownNote", (40, -400), [SWEEP_NOTE], title="Read me", size=[900, 360])
    loader = g.add("LoadDreamPose", (40, 40), list(LOADER), models=[SD15, CLIP])
    photo = g.add("LoadImage", (40, 360), ["key_frame.png", "image"], title="Subject photo")
    uv = g.add("DreamPoseLoadUV", (40, 780), ["dreampose_poses", 0, 0])
    enc = g.add("CLIPVAEAdapterEncode", (420, 40), ["sample", 0, "fixed"])
    win = g.add("DensePoseWindow5", (420, 780), [512, 640])
    g.link(loader, 0, enc, "model")
    g.link(photo, 0, enc, "image")
    g.link(uv, 0, win, "uv")
    rows = []
    for r, si in enumerate(SWEEP):
        row = []
        for c, sp in enumerate(SWEEP):
            x, y = 820 + c * 760, 40 + r * 420
            s = g.add("DualCFGSampler", (x, y), [si, sp, 100, "pndm", 0, "fixed", 4, "official", "none"],
                      title=f"s_image {si:g} × s_pose {sp:g}")
            g.link(loader, 0, s, "model")
            g.link(enc, 0, s, "cond")
            g.link(win, 0, s, "poses")
            save = g.add("SaveAnimatedWEBP", (x + 360, y), [f"dreampose_sweep/si{si:g}_sp{sp:g}", 12.0, False, 90,
                                                            "default"], size=[360, 380])
            g.link(s, 0, save, "images")
            row.append(s)
        rows.append(row)
    # the grid: each row stitched left to right, then the rows top to bottom (frame by frame)
    stitched = []
    for r, row in enumerate(rows):
        left = row[0]
        for c, s in enumerate(row[1:]):
            st = g.add("ImageStitch", (3100, 40 + r * 420 + c * 200), ["right", True, 8, "white"])
            g.link(left, 0, st, "image1")
            g.link(s, 0, st, "image2")
            left = st
        stitched.append(left)
    top = stitched[0]
    for k, st in enumerate(stitched[1:]):
        down = g.add("ImageStitch", (3480, 40 + k * 220), ["down", True, 8, "white"])
        g.link(top, 0, down, "image1")
        g.link(st, 0, down, "image2")
        top = down
    grid = g.add("SaveAnimatedWEBP", (3860, 40), ["dreampose_sweep/grid", 12.0, False, 90, "default"],
                 title="Grid (rows s_image 3/5/7, columns s_pose 3/5/7)", size=[600, 700])
    g.link(top, 0, grid, "images")
    return g


DEMO_NOTE = """## DreamPose demo: no download, no input files

**Load DreamPose Demo Model** loads the small DreamPose shipped inside this pack (a few MB, trained with \
`python -m dreampose train` on the pack's synthetic world). **DreamPose Synthetic Person** gives a person it never saw \
in training: their key frame, a driving motion as DensePose UV, and the ground truth of that motion.

The paper's subject phase comes next, short: **Subject Finetune** (UNet + adapter, 100 steps) and \
**VAE Decoder Finetune** (100 steps) on the key frame and its own pose, saved in `models/dreampose/subjects/` and \
reused next time. Then the usual chain: **Encode Key Frame** → **Pose Windows** (128×192, the demo model's size) → \
**Dual-CFG Sampler** (DDIM, 20 steps) → an animated WEBP. The previews show the driving poses and the ground truth to \
compare with. Change `subject` and `motion` to try other people and movements. About a minute on a CPU.

The demo model knows only the synthetic world: for photos, use *dreampose_animate* with the released DreamPose \
weights."""


def demo(oi: dict) -> Graph:
    g = Graph(oi)
    g.add("MarkdownNote", (40, -330), [DEMO_NOTE], title="Read me", size=[900, 300])
    model = g.add("DreamPoseDemoModel", (40, 40), ["auto", "auto"])
    person = g.add("DreamPoseSyntheticPerson", (40, 260), [0, "walk", 16, 128, 192])
    sub = g.add("SubjectFinetune", (420, 40), ["demo_subject", 100, 1e-4, 0, True, False, False, "fp32", "adamw", 0])
    vae = g.add("VAEDecoderFinetune", (800, 40), ["demo_subject_vae", 100, 1e-4, 0, True, False, "fp32", "l1", 0.6])
    enc = g.add("CLIPVAEAdapterEncode", (1180, 40), ["sample", 0, "fixed"])
    win = g.add("DensePoseWindow5", (1180, 300), [128, 192])
    samp = g.add("DualCFGSampler", (1560, 40), [3.0, 3.0, 20, "ddim", 0, "fixed", 8, "official", "none"])
    save = g.add("SaveAnimatedWEBP", (1940, 40), ["DreamPose_demo", 8.0, False, 90, "default"], size=[360, 520])
    poses = g.add("PreviewImage", (420, 560), size=[360, 420], title="Driving poses")
    truth = g.add("PreviewImage", (800, 560), size=[360, 420], title="Ground truth")
    g.link(model, 0, sub, "model")
    g.link(person, 0, sub, "images")
    g.link(person, 4, sub, "poses")
    g.link(sub, 0, vae, "model")
    g.link(person, 0, vae, "images")
    g.link(vae, 0, enc, "model")
    g.link(person, 0, enc, "image")
    g.link(person, 1, win, "uv")
    g.link(vae, 0, samp, "model")
    g.link(enc, 0, samp, "cond")
    g.link(win, 0, samp, "poses")
    g.link(samp, 0, save, "images")
    g.link(person, 3, poses, "images")
    g.link(person, 2, truth, "images")
    return g


NATIVE_NOTE = """## DreamPose on ComfyUI's own sampling

The same animation as *dreampose_animate*, built from core nodes: DreamPose gives the conditionings and the start \
latent, ComfyUI samples.

1. **Models** as in *dreampose_animate*. **LoraLoaderModelOnly** puts a LoRA on the DreamPose UNet: a subject LoRA \
that *Subject Finetune* wrote to `models/loras/` (`lora_rank` > 0; use the same subject's finetuned model or photo), \
or any SD 1.x LoRA. No LoRA? Bypass the node (Ctrl+B).
2. **Encode Key Frame** gives the subject's CONDITIONING (`image`) and the null image's (`null`); **Apply Pose** adds \
the pose windows: `positive` = image + pose, `image_only` = image + null pose, `negative` = null + null, and a start \
latent with one frame per pose, all frames sharing one noise.
3. **DualCFGGuider** is DreamPose's dual guidance: `cfg_conds` = s_pose (paper 3), `cfg_cond2_negative` = s_image \
(paper 8), style `regular`.
4. Any sampler and scheduler (**KSamplerSelect**, **BasicScheduler**), **SamplerCustomAdvanced**, core **VAE Decode**.

All frames are sampled in one batch (three conds each): for long clips on a small card use *Dual-CFG Sampler*, which \
takes `frames_per_batch` frames at a time and accepts this MODEL in `core_model`."""


def native_sampling(oi: dict) -> Graph:
    g = Graph(oi)
    g.add("MarkdownNote", (40, -400), [NATIVE_NOTE], title="Read me", size=[900, 360])
    loader = g.add("LoadDreamPose", (40, 40), list(LOADER), models=[SD15, CLIP])
    photo = g.add("LoadImage", (40, 400), ["key_frame.png", "image"], title="Subject photo")
    uv = g.add("DreamPoseLoadUV", (40, 820), ["dreampose_poses", 0, 0])
    enc = g.add("CLIPVAEAdapterEncode", (460, 40), ["sample", 0, "fixed"])
    win = g.add("DensePoseWindow5", (460, 820), [512, 640])
    lora = g.add("LoraLoaderModelOnly", (460, 260), ["my_subject.safetensors", 1.0])
    pose = g.add("DreamPoseApplyPose", (860, 400), ["official", 0, "fixed"])
    guider = g.add("DualCFGGuider", (1260, 40), [3.0, 8.0, "regular"], title="DualCFGGuider (cfg_conds = s_pose, "
                                                                              "cfg_cond2_negative = s_image)")
    sampler = g.add("KSamplerSelect", (1260, 340), ["dpmpp_2m"])
    sigmas = g.add("BasicScheduler", (1260, 460), ["karras", 30, 1.0])
    noise = g.add("RandomNoise", (1260, 640), [0, "fixed"])
    run = g.add("SamplerCustomAdvanced", (1660, 300))
    decode = g.add("VAEDecode", (2040, 300))
    save = g.add("SaveAnimatedWEBP", (2300, 300), ["DreamPose_native", 8.0, False, 90, "default"], size=[420, 560])
    g.link(loader, 0, enc, "model")
    g.link(photo, 0, enc, "image")
    g.link(uv, 0, win, "uv")
    g.link(loader, 1, lora, "model")
    g.link(enc, 1, pose, "image")
    g.link(enc, 2, pose, "null")
    g.link(win, 0, pose, "poses")
    g.link(loader, 3, pose, "vae")
    g.link(photo, 0, pose, "key_frame")
    g.link(lora, 0, guider, "model")
    g.link(pose, 0, guider, "cond1")
    g.link(pose, 1, guider, "cond2")
    g.link(pose, 2, guider, "negative")
    g.link(lora, 0, sigmas, "model")
    g.link(noise, 0, run, "noise")
    g.link(guider, 0, run, "guider")
    g.link(sampler, 0, run, "sampler")
    g.link(sigmas, 0, run, "sigmas")
    g.link(pose, 3, run, "latent_image")
    g.link(run, 0, decode, "samples")
    g.link(loader, 3, decode, "vae")
    g.link(decode, 0, save, "images")
    return g


WORKFLOWS = {"dreampose_demo.json": demo,
             "dreampose_native_sampling.json": native_sampling,
             "dreampose_video_to_animation.json": video_to_animation,
             "dreampose_guidance_sweep.json": guidance_sweep}


def main() -> None:
    oi = json.loads(Path(sys.argv[1]).read_text())
    wanted = sys.argv[2:] or list(WORKFLOWS)      # e.g. dreampose_native_sampling.json: that one only
    for name, build in WORKFLOWS.items():
        if name not in wanted:
            continue
        build(oi).save(ROOT / "workflows" / name, name)
        print("wrote", ROOT / "workflows" / name)


if __name__ == "__main__":
    main()
