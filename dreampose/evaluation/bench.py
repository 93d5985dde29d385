"""How much of DreamPose's sampling time is the UNet, and how much is everything around it.

``benchmark`` runs the real path (encode the subject once → pose windows → ``sampling.sample``)
on synthetic inputs and compares the time per chunk of frames with the time of the UNet forwards
that chunk needs, timed bare: the same batch ``3 × frames_per_batch``, input shapes, dtype, device
and clock, as one block of back-to-back forwards as many as a chunk makes (synchronised at its ends
only, as the sampling run is), per forward, median over blocks:

    overhead_ratio = (sample seconds / chunks) / (UNet calls per chunk × bare forward seconds)

1.0 would mean the loop costs nothing but the UNet; what is above it is start latents, scheduler
steps, guidance arithmetic and copies. The sample time includes building x_T (one VAE encode of
the key frame at the output size in ``official`` start mode), as a user waits for it too.
Sampling runs and bare forwards are interleaved so that a machine busy with other work slows both
alike. As a cross-check that does not depend on the bare forward, every UNet forward inside
``sample`` is timed too (CUDA events on a GPU): ``loop_overhead_ratio`` = sample time ÷ the UNet
time inside it, the median over runs.

It also counts the encoder work: how often CLIP and the VAE encoder run while encoding the subject,
while sampling, and inside the denoising loop (after the first UNet call). The subject must be
encoded once; the loop count must be 0.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch

from ..data.synthetic import synthetic_key_frame, synthetic_uv_sequence
from ..errors import DreamPoseError
from ..models.devices import dtype_name, synchronize
from ..models.lora import lora_delta_of
from ..pipeline.animate import prepare
from ..pipeline.guidance import DualCFGDenoiser
from ..pipeline.sampling import SampleStats, decode, make_scheduler, sample
from ..settings import (BENCH_FINETUNE_MODES, LATENT_CHANNELS, MAX_BENCH_FRAMES, MAX_BENCH_REPEATS, BenchSettings,
                        FinetuneSettings, SamplingOptions, check_output_size, check_settings, vae_settings)
from ..training.finetune import check_lora_rank, finetune_subject, finetune_vae_decoder, require_peft


class _Counters:
    """Counts CLIP forwards, VAE encodes and UNet forwards; marks encoder calls after the first UNet
    call; times every UNet forward (CUDA events on a GPU, so nothing is synchronised mid-loop)."""

    def __init__(self, model, device: torch.device):
        self.clip = self.vae_encode = self.unet = 0
        self.clip_in_loop = self.vae_encode_in_loop = 0
        self._in_loop = False
        self._model = model
        self._cuda = device.type == "cuda"
        self._spans: list = []
        self._handles = [model.clip.register_forward_pre_hook(self._on_clip),
                         model.unet.register_forward_pre_hook(self._on_unet),
                         model.unet.register_forward_hook(self._after_unet)]
        self._vae_encode = model.vae.encode
        vae_encode = self._vae_encode

        def counted_encode(*args, **kwargs):
            self.vae_encode += 1
            self.vae_encode_in_loop += self._in_loop
            return vae_encode(*args, **kwargs)

        model.vae.encode = counted_encode   # instance attribute; removed again in close()

    def _on_clip(self, module, args):
        self.clip += 1
        self.clip_in_loop += self._in_loop

    def _on_unet(self, module, args):
        self.unet += 1
        self._in_loop = True
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._spans.append([start, None])
        else:
            self._spans.append([time.perf_counter(), None])

    def _after_unet(self, module, args, output):
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans[-1][1] = end
        else:
            self._spans[-1][1] = time.perf_counter()

    def take_unet_seconds(self) -> float:
        """Total UNet forward time since the last call."""
        if self._cuda:
            torch.cuda.synchronize()   # elapsed_time needs both events completed
            total = sum(a.elapsed_time(b) for a, b in self._spans) / 1000
        else:
            total = sum(b - a for a, b in self._spans)
        self._spans = []
        return total

    def snapshot(self) -> dict:
        return {"clip": self.clip, "vae_encode": self.vae_encode, "unet": self.unet,
                "clip_in_loop": self.clip_in_loop, "vae_encode_in_loop": self.vae_encode_in_loop}

    def end_loop(self) -> None:
        self._in_loop = False

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if self._model.vae.__dict__.get("encode") is not None:
            del self._model.vae.encode


def _timed(fn, device):
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - t0, result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_memory_bytes": int(peak), "peak_memory_mib": round(peak / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated during sampling"}
    try:
        import resource   # Unix only
    except ImportError:
        return {"peak_memory_bytes": None, "peak_memory_mib": None, "peak_memory_kind": "unavailable here"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024   # Linux reports KiB, macOS bytes
    return {"peak_memory_bytes": int(rss_bytes), "peak_memory_mib": round(rss_bytes / 2**20, 1),
            "peak_memory_kind": "process peak RSS (getrusage), whole process including imports"}


def _weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for m in (model.unet, model.adapter, model.vae, model.clip)
               for t in [*m.parameters(), *m.buffers()])


def _load_memory(model, device: torch.device) -> dict:
    """Memory once the model is loaded and placed, before any sampling: the peak so far (CUDA: allocated on
    the device; CPU: the process's peak RSS) and the weights' own size in their dtypes."""
    weights = _weights_bytes(model)
    out = {"weights_mib": round(weights / 2**20, 1)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(load_peak_memory_mib=round(peak / 2**20, 1), load_peak_memory_kind="cuda max_memory_allocated")
    else:
        peak = _peak_memory(device)["peak_memory_bytes"]
        resident = _proc_status("VmRSS")
        out.update(load_peak_memory_mib=None if peak is None else round(peak / 2**20, 1),
                   load_peak_memory_kind="process peak RSS after loading (memory-mapped weights count once read)",
                   resident_after_load_mib=None if resident is None else round(resident / 2**20, 1))
    return out


def benchmark(model, options: SamplingOptions, *, device: torch.device, dtype: torch.dtype = torch.float32,
              frames: int = BenchSettings.frames, repeats: int = BenchSettings.repeats,
              forward_repeats: int = BenchSettings.forward_repeats, warmup: bool = True, log=None) -> dict:
    """Time ``sample`` against bare UNet forwards on synthetic inputs; returns a JSON-ready dict.

    Args:
        model: placed on ``device`` in ``dtype`` here (CLIP in fp32).
        options: the sampling run timed (size, sampler, steps, guidance, start, frames per UNet call, seed).
        frames: frames sampled per run (a multiple of ``options.frames_per_batch``).
        repeats: timed sampling runs (their median is reported), each followed by ``forward_repeats``
            blocks of bare UNet forwards.
    """
    options.check()
    height, width, steps, sampler = options.height, options.width, options.steps, options.sampler
    frames_per_batch = options.frames_per_batch
    if not 1 <= frames <= MAX_BENCH_FRAMES:
        raise DreamPoseError(f"the benchmark samples 1 to {MAX_BENCH_FRAMES} frames, got {frames}")
    if not (1 <= repeats <= MAX_BENCH_REPEATS and 1 <= forward_repeats <= MAX_BENCH_REPEATS):
        raise DreamPoseError(f"repeats and forward repeats must be from 1 to {MAX_BENCH_REPEATS}, got {repeats} and "
                             f"{forward_repeats}")
    if frames % frames_per_batch:
        raise DreamPoseError(f"the benchmark needs frames ({frames}) to be a multiple of frames per batch "
                             f"({frames_per_batch}), so every chunk has the same UNet batch")
    say = log or (lambda msg: None)
    model.place(device, dtype)
    load_memory = _load_memory(model, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counters = _Counters(model, device)
    try:
        generator = torch.Generator().manual_seed(options.seed)
        say("encoding the synthetic subject")
        enc_s, (cond, poses) = _timed(lambda: prepare(
            model, synthetic_key_frame(), synthetic_uv_sequence(frames, height, width), options,
            generator=generator), device)
        encode_counts = counters.snapshot()

        if warmup:
            say("warm-up")
            sample(model, cond, poses, options.replace(steps=min(steps, 2)), generator=generator)
        counters.end_loop()

        # the bare forward: the denoiser's input layout for one chunk, called directly
        scheduler = make_scheduler(sampler, model.scheduler_config)
        scheduler.set_timesteps(steps, device=device)
        n = frames_per_batch
        h, w = height // 8, width // 8
        gen = torch.Generator().manual_seed(options.seed + 1)
        denoiser = DualCFGDenoiser(model.unet, cond.cond.to(device), cond.uncond.to(device),
                                   poses.windows(slice(0, n)).to(device), options.s_image, options.s_pose)
        model_in, hidden = denoiser.inputs()      # the batch the guidance needs, as sampling builds it
        model_in[:, :LATENT_CHANNELS] = torch.randn(model_in.shape[0], LATENT_CHANNELS, h, w, generator=gen
                                                    ).to(device, dtype)
        t_first = scheduler.timesteps[0]

        @torch.no_grad()
        def bare_forwards(count):
            for _ in range(count):
                model.unet(model_in, t_first, encoder_hidden_states=hidden)

        bare_forwards(1)  # warm
        timesteps = len(scheduler.timesteps)

        sample_times, forward_times, loop_unet_times, loop_counts = [], [], [], []
        stats = SampleStats()
        latents = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for r in range(repeats):   # interleaved, so a busy machine slows both sides alike
            say(f"timed run {r + 1}/{repeats}")
            counters.end_loop()
            counters.take_unet_seconds()
            before = counters.snapshot()
            stats = SampleStats()
            secs, latents = _timed(lambda: sample(model, cond, poses, options, generator=generator, stats=stats),
                                   device)
            after = counters.snapshot()
            sample_times.append(secs)
            loop_unet_times.append(counters.take_unet_seconds())
            loop_counts.append({k: after[k] - before[k] for k in after})
            for _ in range(forward_repeats):  # one chunk's worth of back-to-back forwards, like the loop
                forward_times.append(_timed(lambda: bare_forwards(timesteps), device)[0] / timesteps)
            counters.take_unet_seconds()
        memory = _peak_memory(device)
        say("decoding")
        dec_s, _ = _timed(lambda: decode(model, latents, batch_size=frames_per_batch), device)
    finally:
        counters.close()

    chunks = frames // frames_per_batch
    calls = stats.unet_calls
    sample_med = statistics.median(sample_times)
    fwd_med = statistics.median(forward_times)
    per_chunk = sample_med / chunks
    calls_per_chunk = calls / chunks
    last = loop_counts[-1]
    in_loop = max(c["clip_in_loop"] + c["vae_encode_in_loop"] for c in loop_counts)
    result = {
        "model": "tiny" if model.info.get("tiny") else {k: v for k, v in model.info.items() if v},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": dtype_name(dtype),
        "sampler": sampler,
        "steps": steps,
        "timesteps": timesteps,
        "start": options.start,
        "width": width,
        "height": height,
        "size": f"{width}x{height}",
        "frames": frames,
        "frames_per_batch": frames_per_batch,
        "chunks": chunks,
        "unet_batch": stats.unet_batch,
        "unet_calls_total": calls,
        "unet_calls_per_chunk": calls_per_chunk,
        "unet_calls_per_frame": calls / frames,
        "image_evaluations_per_frame": stats.image_evaluations / frames,
        "seconds_per_frame": sample_med / frames,
        "sample_seconds_median": sample_med,
        "sample_seconds_all": sample_times,
        "seconds_per_chunk": per_chunk,
        "bare_unet_forward_seconds": fwd_med,
        "bare_unet_forward_seconds_all": forward_times,
        "overhead_ratio": per_chunk / (calls_per_chunk * fwd_med),
        "overhead_ratio_min": (min(sample_times) / chunks) / (calls_per_chunk * min(forward_times)),
        "unet_seconds_in_loop_all": loop_unet_times,
        "loop_overhead_ratio": statistics.median(t / u for t, u in zip(sample_times, loop_unet_times)),
        "encode_seconds": enc_s,
        "decode_seconds_per_frame": dec_s / frames,
        "encoder_calls": {
            "clip_forwards_encoding_subject": encode_counts["clip"],
            "vae_encodes_encoding_subject": encode_counts["vae_encode"],
            "clip_forwards_per_sample": last["clip"],
            "vae_encodes_per_sample": last["vae_encode"],
            "encoder_calls_in_denoising_loop": in_loop,
            "encoder_calls_per_step": in_loop / (timesteps * chunks),
        },
        "repeats": repeats,
        "bare_forward_blocks": len(forward_times),
        "load_average": _load_average(),
    }
    result.update(memory)
    result.update(load_memory)
    if memory.get("peak_memory_bytes") is not None:
        result["peak_over_weights"] = round(memory["peak_memory_bytes"] / 2**20 / load_memory["weights_mib"], 3)
    return result


# ----------------------------------------------------------------------------------------------- finetuning

FINETUNE_MODES = BENCH_FINETUNE_MODES


def _rss_reset() -> int | None:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5); current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _finetune_memory_start(device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"kind": "cuda", "before": torch.cuda.memory_allocated(device)}
    before = _rss_reset()
    return {"kind": "rss" if before is not None else "getrusage", "before": before}


def _finetune_memory_end(device: torch.device, start: dict) -> dict:
    if start["kind"] == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_memory_mib": round(peak / 2**20, 1),
                "extra_memory_mib": round((peak - start["before"]) / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated during the run (model already on the GPU included); "
                                    "extra = peak − allocated before"}
    if start["kind"] == "rss":
        peak = _proc_status("VmHWM")
        return {"peak_memory_mib": round(peak / 2**20, 1),
                "extra_memory_mib": round((peak - start["before"]) / 2**20, 1),
                "peak_memory_kind": "process peak RSS during this mode (Linux VmHWM, reset before it); "
                                    "extra = peak − RSS before the mode"}
    mem = _peak_memory(device)
    return {"peak_memory_mib": mem["peak_memory_mib"], "extra_memory_mib": None,
            "peak_memory_kind": mem["peak_memory_kind"] + " (cannot be reset: monotonic over the modes)"}


def benchmark_finetune(model, *, device: torch.device, height: int = 256, width: int = 256,
                       steps: int = BenchSettings.finetune_steps, lora_rank: int = BenchSettings.lora_rank,
                       batch_size: int = 1, precision: str = BenchSettings.precision, seed: int = BenchSettings.seed,
                       modes=FINETUNE_MODES, log=None) -> dict:
    """Seconds per optimizer step and peak memory of each finetune mode on a synthetic subject.

    ``seconds_per_step`` is the median step after the first (the first also clones the networks and
    encodes the photo's condition: reported as ``first_step_seconds``).
    """
    check_output_size(height, width)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise DreamPoseError("the finetune benchmark needs at least 2 steps (the first one is set-up)")
    unknown = [m for m in modes if m not in FINETUNE_MODES]
    if unknown:
        raise DreamPoseError(f"unknown finetune modes {unknown}; choose from {FINETUNE_MODES}")
    # every mode's settings checked before any of them runs: a bad rank must not surface after the full modes
    common = dict(steps=steps, lr=1e-5, seed=seed, height=height, width=width, batch_size=batch_size,
                  precision=precision)
    check_settings(vae_settings(**common), "vae")
    check_settings(FinetuneSettings(**common, lora_rank=lora_rank if "lora" in modes else 0), "subject")
    if "lora" in modes:
        check_lora_rank(model.unet, lora_rank)
    say = log or (lambda msg: None)
    model.place(device, torch.float32)
    photo = synthetic_key_frame().float().unsqueeze(0) / 255
    uv = synthetic_uv_sequence(1, 640, 512)
    results = {}
    for mode in modes:
        if mode == "lora":
            try:
                require_peft()
            except DreamPoseError as exc:
                results[mode] = {"skipped": str(exc)}
                continue
        say(f"finetune mode {mode}")
        stamps = []

        def tick(step, total, loss):
            synchronize(device)
            stamps.append((time.perf_counter(), loss))

        start = _finetune_memory_start(device)
        t0 = time.perf_counter()
        if mode == "vae":
            settings = vae_settings(**common)
            new = finetune_vae_decoder(model, photo, settings, device=device, callback=tick)
            trainable = sum(p.numel() for p in new.vae.decoder.parameters())
        else:
            settings = FinetuneSettings(**common, gradient_checkpointing=mode == "full+checkpointing",
                                           lora_rank=lora_rank if mode == "lora" else 0)
            new = finetune_subject(model, photo, uv, settings, device=device, callback=tick)
            adapter = sum(p.numel() for p in new.adapter.parameters())
            if mode == "lora":
                delta = lora_delta_of(new)
                trainable = adapter + sum(a.numel() + b.numel() for a, b in delta.factors.values())
            else:
                trainable = adapter + sum(p.numel() for p in new.unet.parameters())
        memory = _finetune_memory_end(device, start)
        intervals = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        results[mode] = {"seconds_per_step": statistics.median(intervals),
                         "seconds_per_step_all": intervals, "first_step_seconds": stamps[0][0] - t0,
                         "trainable_parameters": trainable, "first_loss": stamps[0][1], "last_loss": stamps[-1][1],
                         **({"lora_rank": lora_rank} if mode == "lora" else {}), **memory}
        del new
    return {
        "model": "tiny" if model.info.get("tiny") else {k: v for k, v in model.info.items() if v and k != "finetune"},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": precision,
        "target_size": f"{width}x{height}",
        "conditioning_size": "512x640",
        "batch_size": batch_size,
        "steps": steps,
        "modes": results,
        "load_average": _load_average(),
    }
