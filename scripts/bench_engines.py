"""The two sampling engines on the same tiny DreamPose, inside a real ComfyUI: the library's own loop
(diffusers UNet and VAE, ``dreampose.pipeline.animate.generate``: what DualCFGSampler ran before)
against DualCFGSampler on core's stack (core
MODEL, ``Guider_DualCFG`` per chunk; the library's DDIM as a core sampler, and core's own ``ddim``).

Run by scripts/bench_engines.sh through tests/comfy_host/probe.py (the pack imported as ComfyUI
imports it). ``BENCH_ENGINES`` (comma-separated: library, core, core_ddim) picks the engines: the
timing run interleaves all three in one process, so background load hits them alike; a memory run
names one engine, so the process's peak RSS is that engine's. Prints one JSON line.
"""
import json
import os
import resource
import statistics
import time

import torch

from dreampose_pack.dreampose.demo.tiny import tiny_dreampose
from dreampose_pack.dreampose.pipeline.conditioning import encode_image_condition
from dreampose_pack.dreampose.pipeline.poses import make_pose_windows
from dreampose_pack.dreampose.pipeline.animate import generate
from dreampose_pack.dreampose.settings import SamplingOptions
from dreampose_pack.nodes.loader import to_native
from dreampose_pack.nodes.sampler import DualCFGSampler

W = H = int(os.environ.get("BENCH_SIZE", "256"))
FRAMES, PER_CALL, STEPS = 8, 4, int(os.environ.get("BENCH_STEPS", "20"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
engines = os.environ.get("BENCH_ENGINES", "library,core,core_ddim").split(",")

torch.manual_seed(0)
model = tiny_dreampose(seed=0, core=True)
g = torch.Generator().manual_seed(1)
windows = make_pose_windows(torch.rand(FRAMES, 2, H // 4, W // 4, generator=g), height=H, width=W)
with torch.inference_mode():
    cond = encode_image_condition(model, torch.rand(3, 320, 256, generator=g), latent_mode="sample",
                                  generator=torch.Generator().manual_seed(2))
options = SamplingOptions(width=W, height=H, steps=STEPS, sampler="ddim", s_image=5.0, s_pose=2.0, seed=3,
                          start="official", frames_per_batch=PER_CALL)
bundle = to_native(tiny_dreampose(seed=0, core=True), "fp32", "fp32") if set(engines) - {"library"} else None


def run(engine: str) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        if engine == "library":      # what DualCFGSampler ran before: denoise and decode chunk by chunk
            for _ in generate(model, cond, windows, options, generator=torch.Generator().manual_seed(3)):
                pass
        else:
            extra = {} if engine == "core" else {"core_sampler": "ddim", "scheduler": "ddim_uniform"}
            DualCFGSampler.execute(bundle, cond, windows, 5.0, 2.0, STEPS, "ddim", 3, PER_CALL, "official", "none",
                                   **extra)
    return time.perf_counter() - t0


for engine in engines:      # warm-up: first-call costs (allocations, kernels) out of the timings
    run(engine)
times = {e: [] for e in engines}
for _ in range(ROUNDS):
    for engine in engines:
        times[engine].append(run(engine))
result = {"size": f"{W}x{H}", "frames": FRAMES, "frames_per_batch": PER_CALL, "steps": STEPS, "sampler": "ddim",
          "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          "note": "s/frame of the whole sampling node's work: x_T, denoising, decoding"}
for engine, ts in times.items():
    result[f"{engine}_s_per_frame"] = round(statistics.median(ts) / FRAMES, 4)
print(json.dumps(result))
