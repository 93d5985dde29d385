"""DreamPose on ComfyUI's own stack (nodes/native.py): the core MODEL, CLIP_VISION and VAE built from
our networks compute what the library computes, in a real ComfyUI (tests/comfy_host/probe.py).

Tiny models with 32-group norms (``tiny_dreampose(core=True)``): core's UNet and VAE code
hard-code GroupNorm(32).
"""
from __future__ import annotations

import pytest

from host_helpers import COMFY_DIR, host_probe

pytestmark = pytest.mark.host

if COMFY_DIR is None:
    pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh (scripts/test.sh does)",
                allow_module_level=True)

SETUP = r"""
import json
import torch
import comfy.model_management as mm
import comfy.samplers
from comfy_extras.nodes_custom_sampler import Guider_DualCFG
from dreampose_pack.nodes import native
from dreampose_pack.dreampose.demo.tiny import tiny_dreampose
from dreampose_pack.dreampose.pipeline.guidance import DualCFGDenoiser
torch.manual_seed(0)
model = tiny_dreampose(seed=4, core=True)
out = {}
"""


def test_core_unet_computes_what_the_diffusers_unet_does(tmp_path):
    got = host_probe(SETUP + r"""
patcher = native.core_unet(model.unet)
core = patcher.model.diffusion_model
g = torch.Generator().manual_seed(1)
x, ctx = torch.randn(3, 14, 8, 8, generator=g), torch.randn(3, 50, 32, generator=g)
t = torch.tensor([999, 500, 1])
with torch.no_grad():
    want = model.unet(x, t, encoder_hidden_states=ctx).sample
    out["diff"] = (core(x, timesteps=t, context=ctx) - want).abs().max().item()
    out["scale"] = want.abs().max().item()
out["in_channels"] = patcher.model.model_config.unet_config["in_channels"]
out["inpaint"] = patcher.model.model_config.inpaint_model()
out["patcher"] = type(patcher).__name__
print(json.dumps(out))
""", tmp_path)
    assert got["diff"] <= 1e-5 * max(1.0, got["scale"]), got
    assert got["in_channels"] == 14 and got["inpaint"] is False and got["patcher"] == "ModelPatcher"


def test_one_core_dual_cfg_evaluation_equals_the_library_denoiser(tmp_path):
    """Core's Guider_DualCFG (style regular, cfg_cond2_negative = s_I, cfg_conds = s_p) on the three
    conds — image + pose, image + null pose, null + null — is DreamPose's Eq. 4, batched in one call."""
    got = host_probe(SETUP + r"""
patcher = native.core_unet(model.unet)
n, s_image, s_pose = 3, 7.5, 2.5
g = torch.Generator().manual_seed(2)
cond, uncond = torch.randn(1, 50, 32, generator=g), torch.randn(1, 50, 32, generator=g)
pose = torch.randn(n, 10, 8, 8, generator=g)
x = torch.randn(n, 4, 8, 8, generator=g)
ms = patcher.model.model_sampling
t = torch.tensor(600)
sigma = ms.sigma(t).reshape(1)
zero = torch.zeros_like(pose)
positive = [[cond, {"noise_concat": pose}]]
middle = [[cond, {"noise_concat": zero}]]
negative = [[uncond, {"noise_concat": zero}]]
guider = Guider_DualCFG(patcher)
guider.set_conds(positive, middle, negative)
guider.set_cfg(s_pose, s_image)          # cfg_conds = s_p, cfg_cond2_negative = s_I
calls, seen = [], {}
patcher.set_model_unet_function_wrapper(
    lambda apply, a: calls.append(a["input"].shape[0]) or apply(a["input"], a["timestep"], **a["c"]))


def one_evaluation(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
    seen["x"] = x
    seen["denoised"] = model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
    return seen["denoised"]


with torch.no_grad():
    guider.sample(x, torch.zeros_like(x), comfy.samplers.KSAMPLER(one_evaluation), torch.cat([sigma, sigma * 0]),
                  seed=0)
    xk = seen["x"]
    eps_core = (xk - seen["denoised"]) / sigma
    lib = DualCFGDenoiser(model.unet, cond, uncond, pose, s_image, s_pose)
    eps_lib = lib(xk / (sigma ** 2 + 1) ** 0.5, t)
out["diff"] = (eps_core - eps_lib).abs().max().item()
out["scale"] = eps_lib.abs().max().item()
out["calls"] = calls
print(json.dumps(out))
""", tmp_path)
    assert got["diff"] <= 1e-4 * max(1.0, got["scale"]), got
    assert got["calls"] == [9], got   # three conds × three frames in one apply_model call


def test_core_clip_and_vae_give_the_librarys_condition(tmp_path):
    """The library's encode_image_condition on the core CLIP_VISION and VAE (through the views) equals
    it on the transformers/diffusers networks: CLIP tokens, the VAE posterior and its seeded sample."""
    got = host_probe(SETUP + r"""
from dreampose_pack.dreampose.pipeline.conditioning import encode_image_condition
clip = native.core_clip_vision(model.clip)
vae = native.core_vae(model.vae, dtype=torch.float32)
view = model.shallow_copy(clip=native.ClipView(clip), vae=native.VAEView(vae))
image = torch.rand(3, 300, 240, generator=torch.Generator().manual_seed(3))
for convention in ("official", "standard"):
    a = encode_image_condition(model, image, convention=convention, generator=torch.Generator().manual_seed(5))
    b = encode_image_condition(view, image, convention=convention, generator=torch.Generator().manual_seed(5))
    out[convention] = max((a.cond - b.cond).abs().max().item(), (a.uncond - b.uncond).abs().max().item())
z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
with torch.no_grad():
    want = (model.vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
out["decode"] = (vae.decode(z).float() - want).abs().max().item()
print(json.dumps(out))
""", tmp_path)
    assert got["official"] <= 1e-4 and got["standard"] <= 1e-4, got
    assert got["decode"] <= 1e-5, got


SAMPLER_SETUP = SETUP + r"""
from dreampose_pack.nodes.loader import to_native
from dreampose_pack.nodes.sampler import DualCFGSampler
from dreampose_pack.nodes import core_sampling as cs
from dreampose_pack.dreampose.pipeline.conditioning import encode_image_condition
from dreampose_pack.dreampose.pipeline.poses import make_pose_windows
from dreampose_pack.dreampose.pipeline.sampling import sample
from dreampose_pack.dreampose.settings import SamplingOptions, VAE_SCALE
W, H, FRAMES = 64, 128, 3
g = torch.Generator().manual_seed(9)
uv = torch.rand(FRAMES, 2, 48, 32, generator=g)
windows = make_pose_windows(uv, height=H, width=W)
key = torch.rand(3, 160, 128, generator=g)
with torch.inference_mode():
    cond = encode_image_condition(model, key, latent_mode="sample", generator=torch.Generator().manual_seed(1))
bundle = to_native(model, "fp32", "fp32")


def library(sampler, steps, start="official", seed=3, lib_model=None):
    options = SamplingOptions(width=W, height=H, steps=steps, sampler=sampler, s_image=5.0, s_pose=2.0, seed=seed,
                              start=start, frames_per_batch=2)
    with torch.inference_mode():
        return sample(lib_model or model, cond, windows, options,
                      generator=torch.Generator().manual_seed(seed)) / VAE_SCALE


def node(sampler, steps, start="official", seed=3, **extra):
    with torch.inference_mode():
        frames, latent = DualCFGSampler.execute(bundle, cond, windows, 5.0, 2.0, steps, sampler, seed, 2, start,
                                                "none", **extra).result
    return latent["samples"]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
"""


def test_dual_cfg_sampler_refuses_a_condition_of_another_model(tmp_path):
    got = host_probe(SAMPLER_SETUP + r"""
from dreampose_pack.dreampose.errors import DreamPoseError
other = to_native(tiny_dreampose(seed=5, core=True), "fp32", "fp32")
try:
    with torch.inference_mode():
        DualCFGSampler.execute(other, cond, windows, 5.0, 2.0, 2, "ddim", 0, 2, "official", "none")
    out["error"] = None
except DreamPoseError as exc:
    out["error"] = str(exc)
out["same"] = rel(node("ddim", 2), library("ddim", 2))       # its own model still takes it
print(json.dumps(out))
""", tmp_path)
    assert got["error"] and "encoded by another DreamPose model" in got["error"], got
    assert got["same"] <= 1e-5, got


def test_a_frame_range_on_the_pose_windows_node_gives_those_frames_of_the_whole_run(tmp_path):
    got = host_probe(SAMPLER_SETUP + r"""
from dreampose_pack.nodes.poses import DensePoseWindow5
whole = DensePoseWindow5.execute(uv, W, H).result[0]
part = DensePoseWindow5.execute(uv, W, H, 1, 2).result[0]
out["frames"] = len(part)
out["windows"] = (part.windows() - whole.windows(slice(1, 3))).abs().max().item()


def run(windows):
    with torch.inference_mode():
        return DualCFGSampler.execute(bundle, cond, windows, 5.0, 2.0, 3, "ddim", 0, 1, "official",
                                      "none").result[1]["samples"]


a, b = run(whole), run(part)
out["latents"] = (b - a[1:3]).abs().max().item()
print(json.dumps(out))
""", tmp_path)
    assert got["frames"] == 2 and got["windows"] == 0.0, got
    assert got["latents"] == 0.0, got          # one frame per call: the same arithmetic, bit for bit


def test_dual_cfg_sampler_on_core_equals_the_library(tmp_path):
    """DualCFGSampler through core (Guider_DualCFG per chunk, core's UNet code): with 'as sampler' every
    library scheduler gives the library's latents; core's own samplers run from the same start."""
    got = host_probe(SAMPLER_SETUP + r"""
for sampler in ("pndm", "ddim", "dpmpp_2m", "euler_a", "unipc"):
    for start in ("official", "noise"):
        out[f"{sampler}/{start}"] = rel(node(sampler, 3, start), library(sampler, 3, start))
# DDIM (eta 0) is Euler on the DDIM timesteps' sigmas; core's ddim_uniform schedule picks those timesteps.
# Core ends at sigma 0, SD's DDIM at t = 0 (sigma 0.029: set_alpha_to_one is false), so the last step differs a
# little; with the final alpha at one, DDIM is core's path exactly.
want = library("ddim", 4)
core_ddim = node("ddim", 4, core_sampler="ddim", scheduler="ddim_uniform")
out["core ddim"] = rel(core_ddim, want)
out["core euler"] = rel(node("ddim", 4, core_sampler="euler", scheduler="ddim_uniform"), want)
to_zero = model.shallow_copy(scheduler_config={**model.scheduler_config, "set_alpha_to_one": True})
out["core ddim vs alpha one"] = rel(core_ddim, library("ddim", 4, lib_model=to_zero))
out["core dpmpp_2m karras"] = rel(node("ddim", 4, core_sampler="dpmpp_2m", scheduler="karras"), want)
print(json.dumps(out))
""", tmp_path)
    print(got)
    # measured: 'as sampler' ≤ 1.4e-6 of the latents' scale; core ddim/euler 3.0e-3 (the last sigma), 1e-6 against
    # DDIM ending at sigma 0
    for name in ("pndm", "ddim", "dpmpp_2m", "euler_a", "unipc"):
        assert got[f"{name}/official"] <= 1e-5 and got[f"{name}/noise"] <= 1e-5, got
    assert got["core ddim"] <= 5e-3 and got["core euler"] <= 5e-3, got
    assert got["core ddim vs alpha one"] <= 1e-4, got
    assert got["core dpmpp_2m karras"] > 1e-3, got     # another sampler is really another path


def test_a_core_lora_on_the_model_reaches_the_frames(tmp_path):
    """core_model: a LoRA applied by core (load_lora_for_models, what LoraLoaderModelOnly runs) on the
    MODEL changes the frames; at strength 0 it changes nothing."""
    got = host_probe(SAMPLER_SETUP + r"""
import comfy.lora
import comfy.sd
keys = comfy.lora.model_lora_keys_unet(bundle.unet.model, {})
name = sorted(k for k in keys if k.startswith("lora_unet_down_blocks_") and k.endswith("_attn2_to_v"))[0]
target = keys[name]
w = bundle.unet.model.state_dict()[target]
gl = torch.Generator().manual_seed(4)
lora = {f"{name}.lora_down.weight": torch.randn(4, w.shape[1], generator=gl),
        f"{name}.lora_up.weight": torch.randn(w.shape[0], 4, generator=gl), f"{name}.alpha": torch.tensor(4.0)}
plain = node("ddim", 2)
for strength in (0.0, 1.0):
    patched, _ = comfy.sd.load_lora_for_models(bundle.unet, None, lora, strength, 0)
    out[str(strength)] = rel(node("ddim", 2, core_model=patched), plain)
out["after"] = rel(node("ddim", 2), plain)     # the bundle's own MODEL is untouched
try:
    node("ddim", 2, core_model=object())
except Exception as exc:
    out["not ours"] = str(exc)
print(json.dumps(out))
""", tmp_path)
    assert got["0.0"] == 0.0 and got["after"] == 0.0, got
    assert got["1.0"] > 1e-3, got
    assert "core_model must be the DreamPose UNet" in got["not ours"], got


def test_native_route_refuses_a_latent_of_another_length(tmp_path):
    """Apply Pose's conditionings with a latent of another batch: core would repeat or cut the poses
    without a word; the DreamPose MODEL refuses, saying what to do."""
    got = host_probe(SAMPLER_SETUP + r"""
from dreampose_pack.nodes.apply_pose import DreamPoseApplyPose
image, null = [[cond.cond, {}]], [[cond.uncond, {}]]
positive, image_only, negative, latent = DreamPoseApplyPose.execute(image, null, windows, "noise", 0).result
out["batch_index"] = latent["batch_index"]
out["shape"] = list(latent["samples"].shape)
sigmas = cs.core_sigmas(bundle.unet, "euler", "normal", 2)
noise = torch.randn(FRAMES + 1, 4, H // 8, W // 8)
wide = torch.randn(FRAMES, 4, H // 8, W // 8 + 2)
for label, conds, x in (("long", (positive, image_only, negative), noise), ("no pose", (image, image, null), noise),
                        ("size", (positive, image_only, negative), wide)):
    try:
        cs.sample_chunk(bundle.unet, *conds, 5.0, 2.0, sampler=comfy.samplers.sampler_object("euler"),
                        sigmas=sigmas, noise=x, latent_image=torch.zeros_like(x), seed=0)
    except Exception as exc:
        out[label] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
""", tmp_path)
    assert got["batch_index"] == [0, 0, 0] and got["shape"] == [3, 4, 16, 8], got
    assert got["long"].startswith("DreamPoseError: 3 pose window(s) for a latent batch of 4"), got
    assert "without pose windows" in got["no pose"], got
    assert got["size"].startswith("DreamPoseError: the pose windows are 64×128 (W×H) but the latent is 80×128"), got


@pytest.mark.parametrize("state", ["LOW_VRAM", "NO_VRAM"])
def test_dual_cfg_sampler_under_low_memory_modes(tmp_path, state):
    """The host's low-memory modes (what --lowvram / --novram set on a GPU): core loads the UNet its own
    way — under NO_VRAM partially, the rest cast from the offload device layer by layer — and the frames
    are the same. Core disables the modes for a CPU device, so the probe has it treat the CPU as a GPU."""
    got = host_probe(SAMPLER_SETUP + r"""
calls = []
real_load = mm.load_models_gpu
def recording(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
              force_full_load=False):
    calls.append([[type(getattr(m, "model", m)).__name__ for m in models], force_full_load])
    return real_load(models, memory_required, force_patch_weights, minimum_memory_required, force_full_load)
mm.load_models_gpu = recording
mm.is_device_cpu = lambda device: False
want = library("ddim", 2)
got = node("ddim", 2)
out["diff"] = rel(got, want)
out["vram_state"] = mm.vram_state.name
unet = [lm for lm in mm.current_loaded_models if lm.model is bundle.unet][0].model
out["loaded"], out["size"] = unet.loaded_size(), unet.model_size()
out["calls"] = calls
print(json.dumps(out))
""", tmp_path, vram_state=state)
    assert got["vram_state"] == state
    assert got["diff"] <= 1e-5, got
    unet_loads = [force for models, force in got["calls"] if "DreamPoseUNet" in models]
    assert unet_loads and not any(unet_loads), got     # core decides how much of the UNet to load
    if state == "NO_VRAM":
        assert got["loaded"] < got["size"], got        # partially loaded, and the same frames


def test_vae_export_loads_in_core_vae_loader(tmp_path):
    """VAEDecoderFinetune's models/vae file is what core's stock VAELoader reads: an SD 1.x-shaped VAE
    (the shapes core assumes for a file without a config) written by the node's export, loaded by
    VAELoader, decodes as the VAE it came from."""
    got = host_probe(SETUP + r"""
import os
from types import SimpleNamespace
import folder_paths
import nodes as core_nodes
from diffusers import AutoencoderKL
from dreampose_pack.nodes.finetune import export_for_core
torch.manual_seed(1)
sd_vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                       norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
core = native.core_vae(sd_vae, torch.float32)
folder = os.path.join(os.getcwd(), "vae_models")
os.makedirs(folder)
folder_paths.add_model_folder_path("vae", folder, is_default=True)
path = os.path.join(folder, "alice_vae.safetensors")
export_for_core("vae", path, SimpleNamespace(cache_key="k" * 64, path="alice_vae.safetensors", model=None),
                SimpleNamespace(vae=core))
loaded = core_nodes.VAELoader().load_vae("alice_vae.safetensors")[0]
z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
out["diff"] = (loaded.decode(z).float() - core.decode(z).float()).abs().max().item()
out["files"] = os.listdir(folder)
print(json.dumps(out))
""", tmp_path)
    assert got["files"] == ["alice_vae.safetensors"], got     # no temp file left
    assert got["diff"] <= 1e-5, got


def test_fp8_weight_storage(tmp_path):
    """dtype fp8_e4m3fn: core stores the UNet's weights in 8 bits and computes in its manual-cast dtype
    (fp32 on the CPU); the frames stay close to fp32's (fp8 rounds each weight to ~6 % at worst)."""
    got = host_probe(SAMPLER_SETUP + r"""
fp8 = to_native(tiny_dreampose(seed=4, core=True), "fp8_e4m3fn", "fp32")
weights = fp8.unet.model.diffusion_model.state_dict()
out["dtypes"] = sorted({str(v.dtype) for k, v in weights.items() if k.endswith(".weight") and v.ndim > 1})
out["compute"] = str(fp8.compute_dtype)
want = node("ddim", 2)
bundle = fp8
got8 = node("ddim", 2)
out["finite"] = bool(torch.isfinite(got8).all())
out["rel"] = rel(got8, want)
print(json.dumps(out))
""", tmp_path)
    assert got["dtypes"] == ["torch.float8_e4m3fn"] and got["compute"] == "torch.float32", got
    assert got["finite"] and 0 < got["rel"] < 0.2, got


def test_guidance_interval_on_core_equals_the_library(tmp_path):
    """Guidance limited to part of the schedule (IntervalDualCFG): outside it core evaluates the image-and-pose
    cond alone; 'as sampler' then gives the library's latents with the same interval, and the full interval is
    the plain guider exactly."""
    got = host_probe(SAMPLER_SETUP + r"""
from dreampose_pack.dreampose.pipeline.guidance import guided_at
batches = []
bundle.unet.set_model_unet_function_wrapper(
    lambda apply, a: batches.append(a["input"].shape[0]) or apply(a["input"], a["timestep"], **a["c"]))
options = SamplingOptions(width=W, height=H, steps=4, sampler="ddim", s_image=5.0, s_pose=2.0, seed=3, start="official",
                          frames_per_batch=2, guidance_start=0.0, guidance_end=0.5)
with torch.inference_mode():
    want = sample(model, cond, windows, options, generator=torch.Generator().manual_seed(3)) / VAE_SCALE
got = node("ddim", 4, guidance_start=0.0, guidance_end=0.5)
out["interval"] = rel(got, want)
out["batches"] = batches[:]
sched = cs.make_scheduler("ddim", model.scheduler_config)
sched.set_timesteps(4)
out["guided"] = [guided_at(t, 0.0, 0.5) for t in sched.timesteps.tolist()]
batches.clear()
out["full"] = (node("ddim", 4, guidance_start=0.0, guidance_end=1.0) - node("ddim", 4)).abs().max().item()
out["plain"] = rel(node("ddim", 4), want)
print(json.dumps(out))
""", tmp_path)
    assert got["interval"] <= 1e-5, got
    assert got["plain"] > 1e-3, got                       # the interval really changed the frames
    assert got["full"] == 0.0, got
    assert True in got["guided"] and False in got["guided"], got
    # chunks of 2 frames, then 1: three conds per guided step, one outside the interval
    want = [3 * n if g else n for n in (2, 1) for g in got["guided"]]
    assert got["batches"] == want, got


def test_reference_and_cross_frame_attention_on_core_equal_the_library(tmp_path):
    """Shared self-attention through core attention patches on a clone of the MODEL: 'as sampler' gives the
    library's latents (chunks of 2: the anchor of the second chunk is a source row); the MODEL passed in is
    left as it was; a Cancel inside such a run stops it; UV smoothing on the pose-windows node is the library's."""
    got = host_probe(SAMPLER_SETUP + r"""
from dreampose_pack.nodes.poses import DensePoseWindow5
from dreampose_pack.dreampose.pipeline.poses import smooth_uv
before = (dict(bundle.unet.model_options), bundle.unet.patches_uuid)
plain = node("ddim", 3)
for name, extra in (("reference", dict(reference_attention=1.0)),
                    ("cross", dict(cross_frame_attention=1.0)),
                    ("both previous", dict(reference_attention=0.5, cross_frame_attention=0.8,
                                           cross_frame_anchor="previous"))):
    options = SamplingOptions(width=W, height=H, steps=3, sampler="ddim", s_image=5.0, s_pose=2.0, seed=3,
                              frames_per_batch=2, **extra)
    with torch.inference_mode():
        want = sample(model, cond, windows, options, generator=torch.Generator().manual_seed(3)) / VAE_SCALE
    out[name] = rel(node("ddim", 3, **extra), want)
    out[name + " vs plain"] = rel(want, plain)
out["model kept"] = (dict(bundle.unet.model_options) == before[0] and bundle.unet.patches_uuid == before[1])
out["plain again"] = (node("ddim", 3) - plain).abs().max().item()
calls = []
def cancel_after_two(*a, **k):
    calls.append(1)
    if len(calls) == 2:
        mm.interrupt_current_processing(True)
    return None
import comfy.utils
comfy.utils.set_progress_bar_global_hook(cancel_after_two)
try:
    node("ddim", 3, reference_attention=1.0, cross_frame_attention=1.0)
    out["cancelled"] = False
except mm.InterruptProcessingException:
    out["cancelled"] = True
finally:
    mm.interrupt_current_processing(False)
    comfy.utils.set_progress_bar_global_hook(None)
out["plain after cancel"] = (node("ddim", 3) - plain).abs().max().item()
smoothed = DensePoseWindow5.execute(uv, W, H, 0, 0, 1).result[0]
out["smoothing"] = (smoothed.windows() - make_pose_windows(smooth_uv(uv, 1), H, W).windows()).abs().max().item()
out["smoothing changes"] = (smoothed.windows() - windows.windows()).abs().max().item()
print(json.dumps(out))
""", tmp_path)
    print(got)
    for name in ("reference", "cross", "both previous"):
        assert got[name] <= 1e-4, got
        assert got[name + " vs plain"] > 1e-3, got         # the option really changed the frames
    assert got["model kept"] and got["plain again"] == 0.0, got
    assert got["cancelled"] and got["plain after cancel"] == 0.0, got
    assert got["smoothing"] == 0.0 and got["smoothing changes"] > 0, got
