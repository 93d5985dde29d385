"""Bad inputs through every node that takes tensors, in a real ComfyUI host: each is refused with a
DreamPoseError (the message the user reads: what was wrong, what to do), never a raw library exception."""
from __future__ import annotations

import pytest

from host_helpers import COMFY_DIR, host_probe

pytestmark = pytest.mark.host

if COMFY_DIR is None:
    pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh (scripts/test.sh does)",
                allow_module_level=True)

PROBE = r"""
import json, tempfile
import torch
from dreampose_pack.dreampose.demo.tiny import tiny_dreampose
from dreampose_pack.dreampose.errors import DreamPoseError
from dreampose_pack.dreampose.pipeline.poses import make_pose_windows
from dreampose_pack.nodes.loader import to_native
from dreampose_pack.nodes.encode import CLIPVAEAdapterEncode
from dreampose_pack.nodes.poses import DensePoseWindow5
from dreampose_pack.nodes.apply_pose import DreamPoseApplyPose
from dreampose_pack.nodes.sampler import DualCFGSampler
from dreampose_pack.nodes.densepose import DreamPoseSaveUV
nan = float("nan")
bundle = to_native(tiny_dreampose(seed=4, core=True), "fp32", "fp32")
good_image = torch.rand(1, 64, 64, 3)
good_uv = torch.rand(3, 2, 32, 32)
with torch.inference_mode():
    cond = CLIPVAEAdapterEncode.execute(bundle, good_image, "sample", 0).result[0]
windows = DensePoseWindow5.execute(good_uv, 64, 64).result[0]
cases = {
    "encode: empty batch": lambda: CLIPVAEAdapterEncode.execute(bundle, torch.rand(0, 64, 64, 3), "sample", 0),
    "encode: two channels": lambda: CLIPVAEAdapterEncode.execute(bundle, torch.rand(1, 64, 64, 2), "sample", 0),
    "encode: NaN pixels": lambda: CLIPVAEAdapterEncode.execute(bundle, torch.full((1, 64, 64, 3), nan), "sample", 0),
    "encode: 0..255 pixels": lambda: CLIPVAEAdapterEncode.execute(bundle, torch.rand(1, 64, 64, 3) * 255, "sample", 0),
    "encode: no image": lambda: CLIPVAEAdapterEncode.execute(bundle, None, "sample", 0),
    "encode: not a model": lambda: CLIPVAEAdapterEncode.execute("model", good_image, "sample", 0),
    "windows: 3-d uv": lambda: DensePoseWindow5.execute(torch.rand(3, 32, 32), 64, 64),
    "windows: 3 channels": lambda: DensePoseWindow5.execute(torch.rand(3, 3, 32, 32), 64, 64),
    "windows: no frames": lambda: DensePoseWindow5.execute(torch.rand(0, 2, 32, 32), 64, 64),
    "windows: NaN uv": lambda: DensePoseWindow5.execute(torch.full((3, 2, 32, 32), nan), 64, 64),
    "windows: 0..255 uv": lambda: DensePoseWindow5.execute(torch.rand(3, 2, 32, 32) * 255, 64, 64),
    "windows: width not a multiple of 64": lambda: DensePoseWindow5.execute(good_uv, 65, 64),
    "windows: range past the end": lambda: DensePoseWindow5.execute(good_uv, 64, 64, 5, 2),
    "windows: windows again": lambda: DensePoseWindow5.execute(windows, 64, 64),
    "apply pose: raw uv": lambda: DreamPoseApplyPose.execute([[cond.cond, {}]], [[cond.uncond, {}]], good_uv,
                                                             "official", 0),
    "sampler: raw uv": lambda: DualCFGSampler.execute(bundle, cond, good_uv, 3.0, 3.0, 2, "ddim", 0, 2, "official",
                                                      "none"),
    "sampler: no condition": lambda: DualCFGSampler.execute(bundle, None, windows, 3.0, 3.0, 2, "ddim", 0, 2,
                                                            "official", "none"),
    "sampler: interval backwards": lambda: DualCFGSampler.execute(bundle, cond, windows, 3.0, 3.0, 2, "ddim", 0, 2,
                                                                  "official", "none", guidance_start=0.8,
                                                                  guidance_end=0.2),
    "save uv: windows": lambda: DreamPoseSaveUV.execute(windows, tempfile.mkdtemp(), "npy", 0, False),
    "save uv: NaN uv": lambda: DreamPoseSaveUV.execute(torch.full((2, 2, 8, 8), nan), tempfile.mkdtemp(), "npy", 0,
                                                       False),
}
out = {}
for name, run in cases.items():
    try:
        with torch.inference_mode():
            run()
        out[name] = ["accepted", ""]
    except DreamPoseError as exc:
        out[name] = ["DreamPoseError", str(exc)]
    except Exception as exc:
        out[name] = [type(exc).__name__, str(exc)[:300]]
print(json.dumps(out))
"""


def test_every_bad_tensor_input_is_refused_with_a_dreampose_error(tmp_path):
    got = host_probe(PROBE, tmp_path)
    raw = {name: kind_message for name, kind_message in got.items() if kind_message[0] != "DreamPoseError"}
    assert not raw, raw
    assert all(len(message) > 20 for _, message in got.values()), got
