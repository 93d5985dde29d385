"""Quality against cost: sampling settings compared on the same videos, seeds and (optional) finetunes.

Each :class:`SweepRow` is one way of sampling (sampler, steps, guidance scales, guidance interval).
:func:`run_sweep` generates every video with every row for every seed and scores each
(row, seed) over all frames of all videos: L1, SSIM, pose IoU (generated silhouette vs the driving
pose's body) and the flicker ratio, with the cost in image evaluations per frame (3 per guided step,
1 outside the guidance interval) and seconds per frame. :func:`summarise` gives mean and spread over
seeds, so a difference between rows can be read against seed-to-seed noise; rows marked
``sensitivity`` are settings that must come out worse (one or two steps, no guidance), to show the
benchmark can tell.

Per video and seed the subject finetune (when asked) runs once and every row samples the finetuned
model; the finetune and the start noise draw from the seed, so two rows differ only in sampling.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..data.world import body_mask, silhouette
from ..errors import DreamPoseError
from ..files.atomic import write_text_atomic
from ..pipeline.animate import generate, prepare
from ..pipeline.poses import make_pose_windows, smooth_uv
from ..pipeline.sampling import SampleStats
from ..settings import FinetuneSettings, SamplingOptions, vae_settings
from ..training.finetune import finetune_subject, finetune_vae_decoder
from . import metrics as M

METRICS = ("l1", "ssim", "pose_iou", "flicker_ratio")
# scenes with the exact part index of every pixel; texture_*: on the generated person's pixels only
DRIFT_METRICS = ("drift", "key_drift", "texture_drift", "key_texture_drift")
FLOORS = tuple(m + "_floor" for m in DRIFT_METRICS)   # the true frames' own drift on the same cells
BETTER = {"l1": "lower", "ssim": "higher", "pose_iou": "higher", "flicker_ratio": "closer to 1",
          **{m: "lower" for m in DRIFT_METRICS}}
TITLES = {"l1": "L1 ↓", "ssim": "SSIM ↑", "pose_iou": "pose IoU ↑", "flicker_ratio": "flicker ratio (→1)",
          "drift": "drift ↓", "key_drift": "key drift ↓", "texture_drift": "texture drift ↓",
          "key_texture_drift": "key texture drift ↓"}


@dataclass(frozen=True)
class SweepRow:
    """One sampling setting of the table."""

    name: str
    sampler: str
    steps: int
    s_image: float = 3.0
    s_pose: float = 3.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    sensitivity: bool = False      # expected to be worse: shows the benchmark tells settings apart
    reference_attention: float = 0.0
    cross_frame_attention: float = 0.0
    cross_frame_anchor: str = "first"
    uv_smoothing: int = 0

    def options(self, base: SamplingOptions, seed: int) -> SamplingOptions:
        return base.replace(sampler=self.sampler, steps=self.steps, s_image=self.s_image, s_pose=self.s_pose,
                            guidance_start=self.guidance_start, guidance_end=self.guidance_end, seed=seed,
                            reference_attention=self.reference_attention,
                            cross_frame_attention=self.cross_frame_attention,
                            cross_frame_anchor=self.cross_frame_anchor, uv_smoothing=self.uv_smoothing).check()


@dataclass(frozen=True)
class Scene:
    """A test video: the subject photo, the driving DensePose and the true frames."""

    name: str
    key_frame: torch.Tensor   # [3,H,W] uint8
    key_uv: torch.Tensor      # [2,H,W]
    uv: torch.Tensor          # [F,2,H,W] the driving DensePose (jittered, for a degraded scene)
    truth: torch.Tensor       # [F,3,H,W] 0..1
    parts: torch.Tensor | None = None       # [F,H,W] exact part index of the truth's pixels (for the drift)
    key_parts: torch.Tensor | None = None   # [H,W] the key frame's
    true_uv: torch.Tensor | None = None     # [F,2,H,W] the truth's exact UV when ``uv`` is degraded; else ``uv``

    @property
    def exact_uv(self) -> torch.Tensor:
        return self.uv if self.true_uv is None else self.true_uv


@dataclass(frozen=True)
class Finetune:
    """The subject finetune every row samples from (UNet + adapter, then VAE decoder), seeded per run."""

    steps: int
    vae_steps: int
    lr: float
    vae_lr: float
    lora_rank: int = 0            # 0: the full UNet + adapter finetune
    decoder_loss: str = "mse"     # the decoder finetune's loss and kept share of its change (settings.py)
    decoder_blend: float = 1.0

    def apply(self, model, scene: Scene, seed: int, height: int, width: int):
        return self.on_key_frame(model, scene.key_frame, scene.key_uv, seed, height, width)

    def on_key_frame(self, model, key_u8: torch.Tensor, key_uv: torch.Tensor, seed: int, height: int, width: int,
                     callback=None):
        """Both finetunes on one key frame ``[3,H,W]`` uint8 with its UV ``[2,H,W]``; returns a new model
        (``model`` itself when both step counts are 0). ``callback(stage, step, total, loss)`` after every
        optimizer step, ``stage`` ``"subject"`` then ``"vae"``."""
        image = key_u8.float().unsqueeze(0) / 255
        if self.steps:
            model = finetune_subject(model, image, key_uv.unsqueeze(0),
                                     FinetuneSettings(steps=self.steps, lr=self.lr, seed=seed, height=height,
                                                      width=width, lora_rank=self.lora_rank),
                                     callback=None if callback is None else lambda *a: callback("subject", *a))
        if self.vae_steps:
            settings = vae_settings(steps=self.vae_steps, lr=self.vae_lr, seed=seed, height=height, width=width,
                                    decoder_loss=self.decoder_loss, decoder_blend=self.decoder_blend)
            model = finetune_vae_decoder(model, image, settings,
                                         callback=None if callback is None else lambda *a: callback("vae", *a))
        return model


def score(frames: torch.Tensor, scene: Scene) -> dict:
    """Metrics of generated frames ``[F,3,H,W]`` against the scene's truth: means over frames."""
    masks = silhouette(frames)
    out = {"l1": float(M.l1(frames, scene.truth).mean()), "ssim": float(M.ssim(frames, scene.truth).mean()),
           "pose_iou": M.pose_alignment(masks, body_mask(scene.exact_uv))["iou"],
           "flicker_ratio": M.flicker(frames, scene.truth)["ratio"]}
    if scene.parts is not None:
        for prefix, on in (("", None), ("texture_", masks)):
            drift = M.appearance_drift(frames, scene.truth, scene.parts, scene.exact_uv,
                                       key_frame=scene.key_frame.float() / 255, key_parts=scene.key_parts,
                                       key_uv=scene.key_uv, masks=on)
            for name, part in ((prefix + "drift", "consecutive"), ("key_" + prefix + "drift", "key")):
                out[name], out[name + "_floor"] = drift[part]["generated"], drift[part]["ground_truth"]
    return out


def run_sweep(model, scenes: list[Scene], rows: list[SweepRow], seeds: list[int], base: SamplingOptions, *,
              finetune: Finetune | None = None, log=None, frames_out: dict | None = None) -> dict:
    """Every row × seed × scene; returns ``{"runs": [...], "finetune_s": …}``, one run per (row, seed)
    with frame-weighted metrics over the scenes, image evaluations per frame and seconds per frame.
    ``frames_out``: a dict that also receives the generated frames ``[F,3,H,W]`` under (row, seed, scene)
    names, for pictures of the same runs the table scores."""
    if not rows or not seeds or not scenes:
        raise DreamPoseError("a sweep needs at least one row, one seed and one scene")
    for row in rows:
        row.options(base, seeds[0])          # every row valid before any work
    log = log or (lambda msg: None)
    names = METRICS + (DRIFT_METRICS + FLOORS if all(sc.parts is not None for sc in scenes) else ())
    acc = {(r.name, s): {"frames": 0, "evaluations": 0, "seconds": 0.0, **{m: 0.0 for m in names}}
           for r in rows for s in seeds}
    finetune_s = 0.0
    for scene in scenes:
        count = scene.uv.shape[0]
        height, width = scene.truth.shape[-2:]
        for seed in seeds:
            tuned = model
            if finetune is not None:
                t0 = time.perf_counter()
                tuned = finetune.apply(model, scene, seed, height, width)
                finetune_s += time.perf_counter() - t0
            # the subject is encoded once per seed; each row then draws on from the same generator state,
            # exactly as animate() with that seed would (condition draws first, then x_T)
            sized = base.replace(height=height, width=width, seed=seed)
            generator = torch.Generator().manual_seed(seed)
            cond, poses = prepare(tuned, scene.key_frame, scene.uv, sized, generator=generator)
            after_encode = generator.get_state()
            windows = {0: poses}       # per UV smoothing radius
            for row in rows:
                options = row.options(sized, seed)
                if row.uv_smoothing not in windows:
                    windows[row.uv_smoothing] = make_pose_windows(smooth_uv(scene.uv, row.uv_smoothing), height,
                                                                  width)
                stats = SampleStats()
                frames = torch.empty(count, 3, height, width)
                generator.set_state(after_encode)
                t0 = time.perf_counter()
                for chunk in generate(tuned, cond, windows[row.uv_smoothing], options, generator=generator,
                                      stats=stats):
                    frames[chunk.frames] = chunk.images.permute(0, 3, 1, 2)
                seconds = time.perf_counter() - t0
                if frames_out is not None:
                    frames_out[(row.name, seed, scene.name)] = frames
                a = acc[(row.name, seed)]
                for name, value in score(frames, scene).items():
                    if name in a:
                        a[name] += value * count
                a["frames"] += count
                a["evaluations"] += stats.image_evaluations
                a["seconds"] += seconds
                log(f"{scene.name} seed {seed} {row.name}: {stats.image_evaluations / count:g} evals/frame, "
                    f"{seconds / count:.3f} s/frame")
            del tuned
    runs = []
    for (name, seed), a in acc.items():
        n = a["frames"]
        runs.append({"row": name, "seed": seed, "frames": n, "evals_per_frame": a["evaluations"] / n,
                     "s_per_frame": a["seconds"] / n, **{m: a[m] / n for m in names}})
    return {"rows": [asdict(r) for r in rows], "seeds": list(seeds), "scenes": [s.name for s in scenes],
            "finetune": asdict(finetune) if finetune else None, "finetune_s": finetune_s, "runs": runs}


def summarise(result: dict) -> list[dict]:
    """Per row: mean and spread (sample standard deviation; 0 with one seed) of every metric over seeds."""
    out = []
    for row in result["rows"]:
        runs = [r for r in result["runs"] if r["row"] == row["name"]]
        entry = {"row": row["name"], "sensitivity": row["sensitivity"], "seeds": len(runs)}
        for key in ("evals_per_frame", "s_per_frame", *METRICS, *DRIFT_METRICS, *FLOORS):
            values = [r[key] for r in runs if r.get(key) is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def within_noise(entry: dict, reference: dict, metric: str, factor: float = 2.0) -> bool:
    """Whether ``entry``'s mean of ``metric`` is no worse than ``reference``'s by more than ``factor`` ×
    the larger of the two seed spreads (a metric that got better always passes)."""
    a, b = entry[metric], reference[metric]
    noise = factor * max(entry[metric + "_sd"], reference[metric + "_sd"])
    if metric == "l1" or metric in DRIFT_METRICS:
        return a <= b + noise
    if metric == "flicker_ratio":
        return abs(a - 1) <= abs(b - 1) + noise
    return a >= b - noise


def markdown_table(summary: list[dict], reference: str | None = None) -> str:
    """The table: one line per row, ``mean ± sd`` over seeds; ``reference`` marks rows within noise of it."""
    ref = next((e for e in summary if e["row"] == reference), None)
    shown = METRICS + (DRIFT_METRICS if any(e.get("drift") is not None for e in summary) else ())
    head = "| setting | image evals/frame | s/frame | " + " | ".join(TITLES[m] for m in shown) + " |"
    lines = [head + (" within noise of the reference |" if ref else ""), "|---" * (3 + len(shown) + bool(ref)) + "|"]
    for e in summary:
        cells = [f"{e['row']}{' (sensitivity)' if e['sensitivity'] else ''}", f"{e['evals_per_frame']:g}",
                 f"{e['s_per_frame']:.3f}"]
        cells += [f"{e[m]:.4f} ± {e[m + '_sd']:.4f}" if e.get(m) is not None else "n/a" for m in shown]
        if ref:
            ok = [m for m in METRICS if e[m] is not None and ref[m] is not None and within_noise(e, ref, m)]
            cells.append("all" if len(ok) == len(METRICS) else ("no: " + ", ".join(m for m in METRICS
                                                                                      if m not in ok)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the scripts' files

def result_paths(out: str, names: tuple[str, ...] = ("sweep.json", "table.md"), force: bool = False) -> list[str]:
    """Where a benchmark script writes, refused before any work when an earlier run's files are there."""
    paths = [os.path.join(out, n) for n in names]
    if not force and any(os.path.exists(x) for x in paths):
        raise DreamPoseError(f"{out} already holds results; pass --force to replace them")
    return paths


def write_results(paths: list[str], result, table: str, record: str | None = None, key: str | None = None) -> None:
    """The result as JSON and the table (atomically); with ``record``, the result is also kept in that JSON file
    under ``key`` (the file's other keys are left as they are)."""
    os.makedirs(os.path.dirname(paths[0]) or ".", exist_ok=True)
    write_text_atomic(paths[0], json.dumps(result, indent=1))
    write_text_atomic(paths[1], table)
    if record:
        recorded = {}
        if os.path.exists(record):
            with open(record) as f:
                recorded = json.load(f)
        recorded[key] = result
        write_text_atomic(record, json.dumps(recorded, indent=1) + "\n")
