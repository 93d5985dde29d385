"""DualCFGSampler: every pose frame denoised with dual image/pose guidance on ComfyUI's sampling
stack, then decoded with the core VAE.

Per chunk of ``frames_per_batch`` frames the three guidance conds (``core_sampling.pose_conditionings``)
go to core's ``Guider_DualCFG``; core loads the UNet (partially when memory is short), evaluates the
three branches in one call with every patch, LoRA and attention backend the MODEL carries, and runs
the sampler. ``core_sampler`` = "as sampler" steps with the library's scheduler (pndm, ddim, ... as
the authors sampled: the frames equal the library's); any other name is a core sampler on the chosen
core scheduler, from the same start (the key frame latent noised to the first sigma, one noise shared
by all frames) and the same seed.
"""
from __future__ import annotations

import math

import torch
import comfy.model_management as mm
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..dreampose.pipeline.conditioning import check_condition_fits, check_condition_source
from ..dreampose.models.attention import SharedAttention
from ..dreampose.pipeline.consistency import anchor_frame, consistency_sources
from ..dreampose.pipeline.sampling import (compose_start, make_scheduler, reference_latent, start_components,
                                           stretch_frames)
from ..dreampose.settings import (ANCHORS, DEFAULT_SAMPLING, SAMPLERS, SAMPLING_PRESETS, START_MODES, STRETCH_MODES,
                                  VAE_SCALE, SamplingOptions)
from . import core_consistency as cc
from . import core_sampling as cs
from . import preview
from .types import DreamPoseCondType, DreamPoseModelType, DreamPosePoseType, require_core_unet, require_model, \
    require_windows

DEFAULTS = DEFAULT_SAMPLING   # dpmpp_2m, 10 steps (docs/benchmarks.md); preset "paper" is the authors'
AS_SAMPLER = "as sampler"   # core_sampler: the library's scheduler named by `sampler`
WIDGETS = "widgets"         # preset: the widgets' own values
PRESET_FIELDS = ("s_image", "s_pose", "steps", "sampler", "guidance_start", "guidance_end")


class DualCFGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualCFGSampler",
            display_name="DreamPose Dual-CFG Sampler",
            category="DreamPose/sampling",
            description=(
                "Generates one frame per pose with DreamPose's dual classifier-free guidance "
                "(eps = eps(0,0) + s_image·(eps(I,0) - eps(0,0)) + s_pose·(eps(I,P) - eps(I,0))) on ComfyUI's "
                "sampling (core's DualCFGGuider: the three branches in one UNet call, partial loading, LoRAs and "
                "patches on the MODEL), then decodes with the model's VAE. Cancel stops within one step."),
            inputs=[
                DreamPoseModelType.Input("model", tooltip="The DreamPose model from Load DreamPose."),
                DreamPoseCondType.Input("cond",
                                        tooltip="The subject's condition from CLIPVAEAdapterEncode (same model)."),
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
                io.Combo.Input("core_sampler", options=[AS_SAMPLER, *comfy.samplers.SAMPLER_NAMES], default=AS_SAMPLER,
                               optional=True,
                               tooltip="'as sampler': step with the scheduler named in 'sampler' (pndm is the "
                                       "authors'; the frames equal the library's). Any other: that ComfyUI sampler "
                                       "on 'scheduler', with the same start, seed and guidance."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal",
                               optional=True,
                               tooltip="ComfyUI noise schedule for 'core_sampler' (unused with 'as sampler')."),
                io.Model.Input("core_model", optional=True,
                               tooltip="Optional: the DreamPose MODEL after core nodes changed it (LoRA loaders, "
                                       "model patches), from Load DreamPose's MODEL output. Unconnected: the "
                                       "bundle's."),
                io.Float.Input("guidance_start", default=DEFAULTS.guidance_start, min=0.0, max=1.0, step=0.01,
                               optional=True,
                               tooltip="Guide only from this fraction of the schedule on (0: from the first, "
                                       "noisiest step). Outside the interval one UNet branch runs instead of three."),
                io.Float.Input("guidance_end", default=DEFAULTS.guidance_end, min=0.0, max=1.0, step=0.01,
                               optional=True,
                               tooltip="Guide only up to this fraction of the schedule (1: to the last step). "
                                       "0 and 1: guidance at every step, as the paper."),
                io.Combo.Input("preset", options=[WIDGETS, *SAMPLING_PRESETS], default=WIDGETS, optional=True,
                               tooltip="widgets: the values above. default: dpmpp_2m 10 steps (30 UNet evaluations "
                                       "per frame); fast: 6 steps, guidance from 0.3 of the schedule on (14); paper: "
                                       "the authors' pndm 100 steps (303). A preset sets s_image, s_pose, steps, "
                                       "sampler and the guidance interval."),
                io.Float.Input("reference_attention", default=DEFAULTS.reference_attention, min=0.0, max=1.0,
                               step=0.05, optional=True,
                               tooltip="Reference attention (beyond the paper): every frame's self-attention also "
                                       "attends to the subject photo's features at the same step, blended with this "
                                       "weight (0 = off, 1 = full). Steadier texture and identity; one more UNet row "
                                       "per guidance branch in each call."),
                io.Float.Input("cross_frame_attention", default=DEFAULTS.cross_frame_attention, min=0.0, max=1.0,
                               step=0.05, optional=True,
                               tooltip="Cross-frame attention (beyond the paper): every frame's self-attention also "
                                       "attends to an anchor frame's, blended with this weight (0 = off). Within a "
                                       "chunk the anchor is its first frame; later chunks see cross_frame_anchor."),
                io.Combo.Input("cross_frame_anchor", options=list(ANCHORS), default=DEFAULTS.cross_frame_anchor,
                               optional=True,
                               tooltip="The anchor of chunks after the first: first = the video's first frame, "
                                       "previous = the previous chunk's last frame (each noised to every step)."),
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
                frames_per_batch: int, start: str, stretch: str, core_sampler: str = AS_SAMPLER,
                scheduler: str = "normal", core_model=None, guidance_start: float = DEFAULTS.guidance_start,
                guidance_end: float = DEFAULTS.guidance_end, preset: str = WIDGETS,
                reference_attention: float = DEFAULTS.reference_attention,
                cross_frame_attention: float = DEFAULTS.cross_frame_attention,
                cross_frame_anchor: str = DEFAULTS.cross_frame_anchor) -> io.NodeOutput:
        if preset != WIDGETS:
            chosen = SAMPLING_PRESETS[preset]
            s_image, s_pose, steps, sampler, guidance_start, guidance_end = (getattr(chosen, f) for f in PRESET_FIELDS)
        model = require_model(model)
        windows = require_windows(poses)
        cond = check_condition_fits(cond, model.cross_attention_dim, model.convention)
        library_view = model.view()
        check_condition_source(library_view, cond)
        options = SamplingOptions(width=windows.width, height=windows.height, steps=steps, sampler=sampler,
                                  s_image=s_image, s_pose=s_pose, seed=seed, start=start,
                                  frames_per_batch=frames_per_batch, stretch=stretch, guidance_start=guidance_start,
                                  guidance_end=guidance_end, reference_attention=reference_attention,
                                  cross_frame_attention=cross_frame_attention,
                                  cross_frame_anchor=cross_frame_anchor).check()
        unet = require_core_unet(core_model) if core_model is not None else model.unet
        image = [[cond.cond, {}]]
        null = [[cond.uncond, {}]]
        # the library's draws, in its order: the key frame's latent sample (official start), then the noise
        generator = torch.Generator("cpu").manual_seed(seed)
        key_latent, noise = start_components(library_view, cond, options, generator=generator, device="cpu")
        if core_sampler == AS_SAMPLER:
            lib = make_scheduler(sampler, model.scheduler_config)
            lib.set_timesteps(steps)
            x_start = compose_start(lib, key_latent, noise)
            sigmas = cs.schedule_sigmas(unet, sampler, steps, model.scheduler_config)
        else:
            sigmas = cs.core_sigmas(unet, core_sampler, scheduler, steps)
            core = comfy.samplers.sampler_object(core_sampler)
        start_latent = key_latent / VAE_SCALE if key_latent is not None else torch.zeros_like(noise)
        sources = None
        shared_sources = consistency_sources(options)
        if shared_sources:     # reference / cross-frame attention: core attention patches on a clone of the MODEL
            reference = (reference_latent(library_view.vae, cond, options, key_latent)
                         if "reference" in shared_sources else None)
            sources = cc.CoreSources(SharedAttention(shared_sources), noise, reference)
            unet = cc.consistent_model(unet, sources)

        total = len(windows)
        chunks = math.ceil(total / frames_per_batch)
        per_chunk = len(sigmas) - 1
        ticks = per_chunk * chunks + chunks   # every step, and one tick per decoded chunk
        pbar = comfy.utils.ProgressBar(ticks)
        previewer = preview.ChunkPreviewer()
        done = [0]

        def on_step(step, x0, x, total_steps):
            done[0] += 1
            pbar.update_absolute(done[0], ticks, previewer(x0))
            mm.throw_exception_if_processing_interrupted()

        # The output is allocated once; each chunk is denoised, decoded and written into it before the
        # next starts, so memory beyond the output does not grow with the number of frames.
        out = mm.intermediate_device()
        h, w = windows.height, windows.width
        frames = torch.empty((total, h, w, 3), dtype=torch.float32, device=out)
        latents = torch.empty((total, 4, h // 8, w // 8), dtype=torch.float32, device=out)
        for first in range(0, total, frames_per_batch):
            part = slice(first, min(first + frames_per_batch, total))
            n = part.stop - part.start
            positive, image_only, negative = cs.pose_conditionings(image, null, windows.windows(part))
            if core_sampler == AS_SAMPLER:
                chunk_sampler = cs.library_sampler(sampler, steps, model.scheduler_config,
                                                   x_start.expand(n, -1, -1, -1), generator)
            else:
                chunk_sampler = core
            z = cs.sample_chunk(unet, positive, image_only, negative, s_image, s_pose, sampler=chunk_sampler,
                                sigmas=sigmas, noise=noise.expand(n, -1, -1, -1).clone(),
                                latent_image=start_latent.expand(n, -1, -1, -1).clone(), seed=seed, callback=on_step,
                                interval=(guidance_start, guidance_end))
            keep = anchor_frame(options, part, sources.anchor is not None) if sources is not None else None
            if keep is not None and "anchor" in shared_sources:
                sources.anchor = cc.chunk_anchor(z, keep - part.start, windows.windows([keep]))
            latents[part] = z.to(out)
            frames[part] = model.vae.decode(z).to(out, torch.float32)
            del z
            done[0] += 1
            pbar.update_absolute(done[0], ticks)
            mm.throw_exception_if_processing_interrupted()
        return io.NodeOutput(stretch_frames(frames, stretch), {"samples": latents})
