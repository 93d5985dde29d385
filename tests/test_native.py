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
