"""Loading at the weights' size: a fp32 file loaded for fp16 never holds the fp32 model as well.

Each case runs in a fresh process whose peak RSS (Linux VmHWM) is reset before loading: it loads a
mid-size DreamPose (a ~100 MB fp32 UNet) straight into fp16, reads every weight (so memory-mapped
tensors are resident too, as in a real run), and reports the growth of peak RSS over the process
before loading. Reading the whole fp32 file and casting afterwards (what loading did before) grows
by the fp32 size plus the fp16 size, about 3× the fp16 weights; the bound here is 1.3× plus a fixed
allowance for the interpreter's own allocations.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

if not sys.platform.startswith("linux"):
    pytest.skip("peak RSS is read from Linux's /proc", allow_module_level=True)

from dreampose.demo.tiny import TINY_UNET, tiny_dreampose
from dreampose.models.unet import expand_conv_in

ALLOWANCE = 48 * 2**20   # allocator slack, config parsing, the tiny CLIP and VAE
MID_UNET = {**TINY_UNET, "block_out_channels": [128, 256, 512], "layers_per_block": 2, "norm_num_groups": 32}

PROBE = r"""
import json, sys, torch
from dreampose.files.weights import read_state_dict
from dreampose.loaders.components import load_authors_unet
from dreampose.loaders.load import load_dreampose
case, path, clip, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
torch.zeros(1).half().sum()                       # warm the allocator and kernels before the baseline
with open("/proc/self/clear_refs", "w") as f:     # reset the peak (VmHWM) to what is resident now
    f.write("5")
before = status("VmRSS")
if case == "ours":
    model = load_dreampose(dreampose=path, clip=clip, dtype=torch.float16)
    modules = [model.unet, model.adapter, model.vae]
elif case == "authors":
    modules = [load_authors_unet(path, config, dtype=torch.float16)]
else:                                             # the old way: the file as stored, cast afterwards
    state = {k: v.half() for k, v in read_state_dict(path).items()}
    modules = []
total = 0.0
weights = 0
for m in modules:
    for p in m.parameters():
        total += float(p.float().sum())          # every weight read once
        weights += p.numel() * p.element_size()
        assert p.dtype == torch.float16
print(json.dumps({"growth": status("VmHWM") - before, "weights": weights}))
"""


def _probe(case: str, path: str, clip: str, config: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, case, path, clip, json.dumps(config)], capture_output=True,
                         text=True, timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mid_files(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("mid")
    torch.manual_seed(0)
    unet = expand_conv_in(UNet2DConditionModel(**MID_UNET))
    small = tiny_dreampose(seed=1)
    ours = str(folder / "mid.safetensors")
    small.shallow_copy(unet=unet).save(ours, include_vae=True)
    authors = str(folder / "unet_epoch_1.pth")
    torch.save({f"module.{k}": v for k, v in unet.state_dict().items()}, authors)
    fp32 = sum(p.numel() * 4 for p in unet.parameters())
    assert fp32 > 80 * 2**20        # mid-size: the bound below is not lost in the allowance
    return {"ours": ours, "authors": authors, "config": {**MID_UNET, "in_channels": 14}}


@pytest.mark.parametrize("case", ["ours", "authors"])
def test_loading_a_fp32_file_for_fp16_grows_memory_by_the_fp16_weights_only(case, mid_files, tiny_clip_folder):
    got = _probe(case, mid_files[case], tiny_clip_folder, mid_files["config"])
    assert got["growth"] <= 1.3 * got["weights"] + ALLOWANCE, got
    print(case, {k: round(v / 2**20, 1) for k, v in got.items()})


def test_the_bound_tells_the_old_way_of_loading_apart(mid_files, tiny_clip_folder):
    # reading the whole fp32 file and then casting: the same fp16 weights, about three times the memory
    old = _probe("old", mid_files["ours"], tiny_clip_folder, mid_files["config"])
    ours = _probe("ours", mid_files["ours"], tiny_clip_folder, mid_files["config"])
    assert old["growth"] > 1.3 * ours["weights"] + ALLOWANCE, (old, ours)
