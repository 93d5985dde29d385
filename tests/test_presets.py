"""The sampling presets are what the quality-vs-cost table chose: rows of the recorded table
(docs/quality_vs_cost.json, written by scripts/quality_vs_cost.py --record) within seed noise of the authors'
PNDM 100 steps on every metric, with and without the subject finetune, at the image evaluations promised."""
import json
from pathlib import Path

import pytest
import torch

from dreampose.demo.tiny import tiny_dreampose
from dreampose.evaluation.sweep import METRICS, summarise, within_noise
from dreampose.pipeline.conditioning import encode_image_condition
from dreampose.pipeline.poses import make_pose_windows
from dreampose.pipeline.sampling import SampleStats, sample
from dreampose.settings import PAPER_SAMPLING, SAMPLING_PRESETS

TABLE = json.loads((Path(__file__).parents[1] / "docs" / "quality_vs_cost.json").read_text())
PARTS = ("no_finetune", "finetune")
KEY = ("sampler", "steps", "guidance_start", "guidance_end")


def _row_of(result: dict, options) -> dict:
    rows = [r for r in result["rows"] if all(r[k] == getattr(options, k) for k in KEY)]
    assert len(rows) == 1, f"no row of the table samples as {options}"
    return rows[0]


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("preset", ["default", "fast"])
def test_each_preset_is_a_row_within_seed_noise_of_the_authors_settings(part, preset):
    result = TABLE[part]
    summary = {e["row"]: e for e in summarise(result)}
    reference = summary[_row_of(result, PAPER_SAMPLING)["name"]]
    entry = summary[_row_of(result, SAMPLING_PRESETS[preset])["name"]]
    assert entry["seeds"] >= 3 and reference["seeds"] >= 3
    assert all(within_noise(entry, reference, m) for m in METRICS), (entry, reference)


@pytest.mark.parametrize("part", PARTS)
def test_the_table_tells_a_bad_setting_apart(part):
    summary = summarise(TABLE[part])
    reference = next(e for e in summary if e["row"] == _row_of(TABLE[part], PAPER_SAMPLING)["name"])
    worse = [e for e in summary if e["sensitivity"] and not all(within_noise(e, reference, m) for m in METRICS)]
    assert worse, "no sensitivity row came out worse: the benchmark cannot tell settings apart"


@pytest.mark.parametrize("preset, evaluations", [("default", 3 * 10), ("fast", 3 * 4 + 2), ("paper", 3 * 101)])
def test_the_presets_cost_what_they_promise(preset, evaluations):
    # at the paper's s_I 8 / s_p 3 every guided step runs three branches; fast guides 4 of its 6 dpmpp_2m
    # timesteps (853 711 | 569 427 285 143: from fraction 0.3 on = timesteps ≤ 699.3), pndm takes 101 steps for 100
    model = tiny_dreampose(seed=2)
    options = SAMPLING_PRESETS[preset].replace(width=64, height=64, frames_per_batch=1)
    cond = encode_image_condition(model, torch.rand(3, 64, 64), generator=torch.Generator().manual_seed(0))
    stats = SampleStats()
    sample(model, cond, make_pose_windows(torch.rand(1, 2, 64, 64), 64, 64), options, stats=stats,
           generator=torch.Generator().manual_seed(0))
    assert stats.image_evaluations == evaluations
    assert evaluations <= {"default": 30, "fast": 15, "paper": 303}[preset]


FINETUNES = json.loads((Path(__file__).parents[1] / "docs" / "finetune_vs_cost.json").read_text())


def _finetune_row(settings_pair) -> tuple[str, dict]:
    subject, vae = settings_pair["subject"], settings_pair["vae"]
    want = {"steps": subject.steps, "vae_steps": vae.steps, "lr": subject.lr, "vae_lr": vae.lr,
            "lora_rank": subject.lora_rank}
    found = [(n, r) for n, r in FINETUNES.items() if r["finetune"] and {k: r["finetune"][k] for k in want} == want]
    assert len(found) == 1, f"no row of the finetune table trains as {want}"
    return found[0]


def test_the_fast_finetune_is_a_row_within_seed_noise_of_the_authors_at_a_tenth_of_the_compute():
    from dreampose.settings import FINETUNE_PRESETS

    _, fast = _finetune_row(FINETUNE_PRESETS["fast"])
    _, paper = _finetune_row(FINETUNE_PRESETS["paper"])
    entry, reference = summarise(fast)[0], summarise(paper)[0]
    assert entry["seeds"] >= 3
    assert all(within_noise(entry, reference, m) for m in METRICS), (entry, reference)
    steps = {k: v["finetune"]["steps"] + v["finetune"]["vae_steps"] for k, v in (("fast", fast), ("paper", paper))}
    assert steps["fast"] * 10 <= steps["paper"], steps      # a tenth of the optimizer steps (each also cheaper)
    none = summarise(FINETUNES["none"])[0]
    assert none["l1"] > entry["l1"] + 2 * max(none["l1_sd"], entry["l1_sd"])   # the finetune does something
