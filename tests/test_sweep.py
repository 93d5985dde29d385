"""The quality-vs-cost sweep (dreampose/evaluation/sweep.py) on a tiny model: what it reports per run equals
what animate() gives with the same seed, its costs are the counted UNet evaluations, its summary is the mean and
spread over seeds."""
import statistics

import pytest
import torch

from dreampose.demo.tiny import tiny_dreampose
from dreampose.errors import DreamPoseError
from dreampose.evaluation.sweep import Scene, SweepRow, markdown_table, run_sweep, score, summarise, within_noise
from dreampose.pipeline.animate import animate
from dreampose.settings import SamplingOptions

BASE = SamplingOptions(width=64, height=64, steps=2, sampler="ddim", s_image=3.0, s_pose=2.0, frames_per_batch=2)


def _scene(seed=0, frames=3):
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(frames, 2, 64, 64, generator=g) * (torch.rand(frames, 1, 64, 64, generator=g) > 0.5)
    return Scene(f"s{seed}", (torch.rand(3, 64, 64, generator=g) * 255).to(torch.uint8), uv[0],
                 uv, torch.rand(frames, 3, 64, 64, generator=g))


def test_each_run_is_animate_with_that_seed_and_counts_its_evaluations():
    model = tiny_dreampose(seed=3)
    scene = _scene()
    rows = [SweepRow("ddim 2", "ddim", 2, 3.0, 2.0), SweepRow("ddim 3 late", "ddim", 3, 3.0, 2.0, guidance_start=0.5)]
    kept = {}
    result = run_sweep(model, [scene], rows, [0, 1], BASE, frames_out=kept)
    assert sorted(kept) == sorted((r.name, s, "s0") for r in rows for s in (0, 1))
    assert [(r["row"], r["seed"]) for r in result["runs"]] == [("ddim 2", 0), ("ddim 2", 1), ("ddim 3 late", 0),
                                                               ("ddim 3 late", 1)]
    for run in result["runs"]:
        row = next(r for r in rows if r.name == run["row"])
        options = row.options(BASE, run["seed"])
        frames = torch.cat([c.images.permute(0, 3, 1, 2) for c in animate(model, scene.key_frame, scene.uv, options)])
        want = score(frames, scene)
        assert {k: run[k] for k in want} == pytest.approx(want, abs=1e-6)
        assert torch.allclose(kept[(run["row"], run["seed"], "s0")], frames, atol=1e-6)   # the frames scored
    runs = {r["row"]: r for r in result["runs"] if r["seed"] == 0}
    assert runs["ddim 2"]["evals_per_frame"] == 2 * 3             # 2 steps × 3 branches
    # ddim 3 steps: timesteps 667, 334, 1; guided from fraction 0.5 on = timesteps ≤ 499.5: two steps
    assert runs["ddim 3 late"]["evals_per_frame"] == 1 + 2 * 3
    assert result["seeds"] == [0, 1] and result["scenes"] == ["s0"]


def test_a_bad_row_is_refused_before_any_work():
    with pytest.raises(DreamPoseError, match="guidance_start"):
        run_sweep(object(), [_scene()], [SweepRow("bad", "ddim", 2, guidance_start=0.9, guidance_end=0.1)], [0], BASE)
    with pytest.raises(DreamPoseError, match="at least one row"):
        run_sweep(object(), [_scene()], [], [0], BASE)


def _result():
    runs = [{"row": "a", "seed": s, "evals_per_frame": 30.0, "s_per_frame": 0.1 * (s + 1), "l1": l1, "ssim": 0.7,
             "pose_iou": iou, "flicker_ratio": 1.1} for s, (l1, iou) in enumerate([(0.05, 0.8), (0.06, 0.84),
                                                                                   (0.07, 0.82)])]
    runs += [{"row": "b", "seed": s, "evals_per_frame": 3.0, "s_per_frame": 0.01, "l1": 0.09, "ssim": 0.6,
              "pose_iou": 0.5, "flicker_ratio": 0.1} for s in range(3)]
    return {"rows": [{"name": "a", "sensitivity": False}, {"name": "b", "sensitivity": True}], "runs": runs}


def test_summary_is_mean_and_sample_spread_over_seeds():
    a, b = summarise(_result())
    assert a["l1"] == pytest.approx(0.06) and a["l1_sd"] == pytest.approx(statistics.stdev([0.05, 0.06, 0.07]))
    assert a["pose_iou"] == pytest.approx(0.82) and a["pose_iou_sd"] == pytest.approx(0.02)
    assert a["s_per_frame"] == pytest.approx(0.2) and a["seeds"] == 3
    assert b["l1_sd"] == 0.0 and b["sensitivity"]
    assert within_noise(a, a, "l1") and not within_noise(b, a, "l1") and not within_noise(b, a, "pose_iou")
    assert not within_noise(b, a, "flicker_ratio")          # 0.1 is farther from 1 than 1.1
    table = markdown_table([a, b], reference="a")
    assert "| a | 30 | 0.200 | 0.0600 ± 0.0100 |" in table
    assert "| b (sensitivity) | 3 |" in table and "no: l1, ssim, pose_iou, flicker_ratio |" in table
