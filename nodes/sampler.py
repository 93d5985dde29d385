"""DualCFGSampler: every pose frame denoised with dual image/pose guidance, then decoded."""
from __future__ import annotations

import math

import torch
import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..dreampose.pipeline.animate import generate
from ..dreampose.pipeline.conditioning import check_condition
from ..dreampose.pipeline.sampling import stretch_frames
from ..dreampose.settings import PAPER_SAMPLING, SAMPLERS, START_MODES, STRETCH_MODES, VAE_SCALE, SamplingOptions
from . import device as dev
from . import preview
from .types import DreamPoseCondType, DreamPoseModelType, DreamPosePoseType, require_windows

DEFAULTS = PAPER_SAMPLING   # the authors' settings


class DualCFGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualCFGSampler",
            display_name="DreamPose Dual-CFG Sampler",
            category="DreamPose/sampling",
            description=(
                "Generates one frame per pose with DreamPose's dual classifier-free guidance "
                "(eps = eps(0,0) + s_image·(eps(I,0) - eps(0,0)) + s_pose·(eps(I,P) - eps(I,0))), the three branches "
                "in one UNet call, then decodes with the model's VAE. Cancel stops within one step."),
            inputs=[
                DreamPoseModelType.Input("model", tooltip="The DreamPose model from Load DreamPose."),
                DreamPoseCondType.Input("cond", tooltip="The subject's condition from CLIPVAEAdapterEncode (same model)."),
                DreamPosePoseType.Input("poses", tooltip="Pose windows from DensePoseWindow5; they set the frame "
                                                         "count and the output size."),
                io.Float.Input("s_image", default=DEFAULTS.s_image, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Image guidance s_I: how strongly frames follow the subject photo (paper: 8)."),
                io.Float.Input("s_pose", default=DEFAULTS.s_pose, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Pose guidance s_p: how strongly frames follow the pose (paper: 3)."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=1000,
                             tooltip="Denoising steps (the authors used 100 with pndm; dpmpp_2m/unipc need fewer)."),
                io.Combo.Input("sampler", options=list(SAMPLERS), default=DEFAULTS.sampler,
                               tooltip="Scheduler on the SD 1.x noise schedule; pndm is the authors'."),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the start noise (CPU generator: the same seed gives the same video on "
                                     "any device)."),
                io.Int.Input("frames_per_batch", default=DEFAULTS.frames_per_batch, min=1, max=64,
                             tooltip="Frames denoised together in one UNet call (×3 for the guidance branches). "
                                     "Higher is faster, needs more VRAM; results do not change."),
                io.Combo.Input("start", options=list(START_MODES), default=DEFAULTS.start,
                               tooltip="official: start from the key frame's latent noised to the first step, one "
                                       "noise shared by all frames (the authors'; steadier video). noise: pure noise."),
                io.Combo.Input("stretch", options=list(STRETCH_MODES), default=DEFAULTS.stretch,
                               tooltip="Contrast stretch of the decoded frames. none (default); per_frame: the "
                                       "authors' min-max per frame (flickers); sequence: one min-max for the clip."),
            ],
            outputs=[
                io.Image.Output(display_name="frames",
                                tooltip="The video frames, an IMAGE batch [frames, H, W, 3] in 0..1."),
                io.Latent.Output(display_name="latent",
                                 tooltip="The frame latents before decoding, in ComfyUI's convention (unscaled SD 1.x "
                                         "VAE latents, so core VAE Decode with an SD 1.x VAE reads them)."),
            ],
        )

    @classmethod
    def execute(cls, model, cond, poses, s_image: float, s_pose: float, steps: int, sampler: str, seed: int,
                frames_per_batch: int, start: str, stretch: str) -> io.NodeOutput:
        windows = require_windows(poses)
        cond = check_condition(model, cond)
        options = SamplingOptions(width=windows.width, height=windows.height, steps=steps, sampler=sampler,
                                  s_image=s_image, s_pose=s_pose, seed=seed, start=start,
                                  frames_per_batch=frames_per_batch, stretch=stretch).check()
        unet_dt, vae_dt, _ = dev.model_dtypes(model)
        chunks = math.ceil(len(windows) / frames_per_batch)
        pbar = comfy.utils.ProgressBar(1)
        previewer = preview.ChunkPreviewer()
        decoded = [0]
        last = [0, 1]  # steps done, steps total

        def ticks_total() -> int:
            return last[1] + chunks  # every step, and one tick per decoded chunk

        def on_step(done: int, total: int, chunk_latents) -> None:
            last[:] = [done, total]
            pbar.update_absolute(done + decoded[0], ticks_total(), previewer(chunk_latents))
            mm.throw_exception_if_processing_interrupted()  # also where no progress hook checks it

        # The output is allocated once; each chunk is denoised, decoded and written into it before the
        # next starts, so memory beyond the output does not grow with the number of frames.
        out = mm.intermediate_device()
        h, w = windows.height, windows.width
        frames = torch.empty((len(windows), h, w, 3), dtype=torch.float32, device=out)
        latents = torch.empty((len(windows), 4, h // 8, w // 8), dtype=torch.float32, device=out)
        batch = 3 * min(frames_per_batch, len(windows))
        extra = dev.working_memory(batch, h, w, unet_dt)
        with dev.borrowed([(model.unet, unet_dt), (model.vae, vae_dt)], extra, owner=model):
            for chunk in generate(model, cond, windows, options, generator=torch.Generator("cpu").manual_seed(seed),
                                  callback=on_step):
                frames[chunk.frames] = chunk.images
                latents[chunk.frames] = chunk.latents / VAE_SCALE
                del chunk
                decoded[0] += 1
                pbar.update_absolute(last[0] + decoded[0], ticks_total())
                mm.throw_exception_if_processing_interrupted()
        return io.NodeOutput(stretch_frames(frames, stretch), {"samples": latents})
