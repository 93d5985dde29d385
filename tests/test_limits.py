"""Numeric options are bounded before any work: a huge LoRA rank, batch size, step count or model config is
one clear DreamPoseError (or argparse's one line), never an allocation traceback or a run that never ends.

The fault sweep's cases: ``finetune-subject --lora-rank 10**9`` / ``--batch-size 10**9``, ``bench --finetune
--lora-rank 10**7``, ``convert --unet-config`` with 200000 channels and ``animate --steps 1001``.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os

import pytest
import torch

from dreampose import settings as S
from dreampose.cli import main as cli
from dreampose.cli.main import build_parser
from dreampose.data.synthetic import synthetic_key_frame, synthetic_uv_sequence
from dreampose.demo.tiny import tiny_dreampose
from dreampose.errors import DreamPoseError
from dreampose.evaluation import bench as bench_mod
from dreampose.training import finetune as ft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LORA_LIMIT = 64     # the tiny UNet's widest attention projection (64 channels in its cross-attention block)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_dreampose(seed=0)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return synthetic_key_frame(96, 64).float().unsqueeze(0) / 255


@pytest.fixture(scope="module")
def pose() -> torch.Tensor:
    return synthetic_uv_sequence(1, 96, 64)


@pytest.fixture()
def no_work(monkeypatch):
    """Fail the test if a finetune gets as far as encoding photos, hashing weights or running a mode."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")
    monkeypatch.setattr(ft, "_prepare_subject", refuse)
    monkeypatch.setattr(ft, "subject_cache_key", refuse)
    monkeypatch.setattr(ft, "clone_module", refuse)
    monkeypatch.setattr(bench_mod, "finetune_subject", refuse)
    monkeypatch.setattr(bench_mod, "finetune_vae_decoder", refuse)


def settings(**kw) -> S.FinetuneSettings:
    return S.FinetuneSettings(**{"steps": 2, "lr": 1e-3, "height": 64, "width": 64, **kw})


def argparse_refuses(argv, capsys, flag: str) -> None:
    """The command line refuses ``argv`` while parsing (parsing only: nothing runs, whatever the code does)."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([str(a) for a in argv])
    assert info.value.code == 2
    assert f"argument {flag}: must be at most" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- LoRA rank

@pytest.mark.parametrize("rank", [10 ** 9, 10 ** 7, S.MAX_LORA_RANK + 1, -1])
def test_lora_rank_out_of_range_is_refused_by_the_settings(rank):
    with pytest.raises(DreamPoseError, match="lora_rank must be 0 .* from 1 to 512"):
        S.check_settings(settings(lora_rank=rank), "subject")
    assert S.check_settings(settings(lora_rank=S.MAX_LORA_RANK), "subject").lora_rank == S.MAX_LORA_RANK


def test_lora_rank_above_the_models_attention_width_is_refused_before_any_work(model, photo, pose, no_work,
                                                                               tmp_path):
    assert ft.lora_rank_limit(model.unet) == TINY_LORA_LIMIT
    with pytest.raises(DreamPoseError, match="at most 64"):
        ft.finetune_subject(model, photo, pose, settings(lora_rank=TINY_LORA_LIMIT + 1))
    with pytest.raises(DreamPoseError, match="at most 64"):
        ft.finetune_to_file("subject", model, photo, pose, settings(lora_rank=TINY_LORA_LIMIT + 1),
                            str(tmp_path / "s.safetensors"))
    with pytest.raises(DreamPoseError, match="lora_rank"):
        ft.finetune_subject(model, photo, pose, settings(lora_rank=10 ** 9))
    assert not (tmp_path / "s.safetensors").exists()


def test_lora_rank_at_the_models_limit_trains(model, photo, pose):
    new = ft.finetune_subject(model, photo, pose, settings(steps=1, lora_rank=TINY_LORA_LIMIT))
    assert new.unet is not model.unet


def test_bench_finetune_refuses_a_huge_rank_before_the_first_mode(model, no_work):
    for rank in (10 ** 7, TINY_LORA_LIMIT + 1):
        with pytest.raises(DreamPoseError, match="lora_rank"):
            bench_mod.benchmark_finetune(model, device=torch.device("cpu"), height=64, width=64, steps=2,
                                         lora_rank=rank)
    with pytest.raises(DreamPoseError, match="batch_size"):
        bench_mod.benchmark_finetune(model, device=torch.device("cpu"), height=64, width=64, steps=2,
                                     batch_size=10 ** 9)


def test_cli_refuses_huge_ranks_in_one_line(capsys, monkeypatch, tiny_dreampose_file, tiny_clip_folder, tmp_path):
    monkeypatch.setattr(bench_mod, "finetune_subject", lambda *a, **k: pytest.fail("a mode ran"))
    monkeypatch.setattr(bench_mod, "finetune_vae_decoder", lambda *a, **k: pytest.fail("a mode ran"))
    argparse_refuses(["bench", "--finetune", "--finetune-steps", 2, "--lora-rank", 10 ** 7, "--quiet"], capsys,
                     "--lora-rank")
    common = ["finetune-subject", "--dreampose", tiny_dreampose_file, "--clip", tiny_clip_folder, "--images",
              "a.png", "--poses", "p", "--out", str(tmp_path / "s.safetensors")]
    argparse_refuses([*common, "--lora-rank", 10 ** 9], capsys, "--lora-rank")
    # within the settings' bound but above the tiny UNet's width: refused once the model is read, before training
    assert cli.main(["bench", "--finetune", "--finetune-steps", "2", "--lora-rank", str(TINY_LORA_LIMIT + 1),
                     "--width", "64", "--height", "64", "--quiet", "--threads", "1"]) == 2
    assert "at most 64" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- batch size, steps

@pytest.mark.parametrize("field, value", [("batch_size", 10 ** 9), ("batch_size", S.MAX_FINETUNE_BATCH + 1),
                                          ("steps", S.MAX_FINETUNE_STEPS + 1), ("batch_size", 0), ("steps", True)])
def test_finetune_sizes_out_of_range_are_refused(field, value, model, photo, pose, no_work):
    for kind in ("subject", "vae"):
        with pytest.raises(DreamPoseError, match=field):
            S.check_settings(settings(**{field: value}), kind)
    with pytest.raises(DreamPoseError, match=field):
        ft.finetune_subject(model, photo, pose, settings(**{field: value}))
    with pytest.raises(DreamPoseError, match=field):
        ft.finetune_vae_decoder(model, photo, S.vae_settings(height=64, width=64, **{field: value}))


def test_training_steps_are_optimizer_steps_not_capped_at_the_sampler_limit():
    assert S.check_settings(settings(steps=S.MAX_STEPS * 5), "subject").steps == 5000
    assert S.check_settings(S.vae_settings(steps=S.MAX_FINETUNE_STEPS), "vae").steps == S.MAX_FINETUNE_STEPS
    assert not S.TrainConfig(data=["d"], out="o", steps=10 ** 6).problems()


def test_cli_finetune_refuses_a_huge_batch_before_loading(capsys, tmp_path):
    common = ["--images", "a.png", "--out", str(tmp_path / "s.safetensors")]
    argparse_refuses(["finetune-subject", *common, "--poses", "p", "--batch-size", 10 ** 9], capsys, "--batch-size")
    argparse_refuses(["finetune-vae", *common, "--batch-size", 10 ** 9], capsys, "--batch-size")
    argparse_refuses(["finetune-vae", *common, "--steps", S.MAX_FINETUNE_STEPS + 1], capsys, "--steps")


def test_bench_settings_are_bounded():
    S.BenchSettings().check()
    for field, value in (("frames", 10 ** 9), ("repeats", 10 ** 6), ("forward_repeats", 10 ** 6),
                         ("finetune_steps", 10 ** 9), ("lora_rank", 10 ** 7), ("finetune_steps", 1)):
        with pytest.raises(DreamPoseError, match=field):
            dataclasses.replace(S.BenchSettings(), **{field: value}).check()


def test_train_batch_sizes_are_bounded():
    problems = S.TrainConfig(data=["d"], out="o", batch_size=10 ** 9, micro_batch=10 ** 9).problems()
    assert any("batch_size must be at most" in p for p in problems)
    assert any("micro_batch must be at most" in p for p in problems)


# ----------------------------------------------------------------------------------------- sampler steps

def test_sampling_steps_are_at_most_the_train_timesteps(model):
    from dreampose.pipeline.animate import prepare

    assert S.MAX_STEPS == 1000
    assert S.SamplingOptions(steps=S.MAX_STEPS).check().steps == 1000
    for steps in (1001, 10 ** 9, 0):
        with pytest.raises(DreamPoseError, match="steps must be a whole number from 1 to 1000"):
            S.SamplingOptions(steps=steps).check()
        with pytest.raises(DreamPoseError, match="steps must be a whole number from 1 to 1000"):
            S.EvalSettings(steps=steps).check()
        with pytest.raises(DreamPoseError, match="steps must be a whole number from 1 to 1000"):
            S.BenchSettings(steps=steps).check()
    S.EvalSettings().check()
    # the library refuses before encoding anything
    options = S.DEMO_SAMPLING.replace(width=64, height=64, steps=1001)
    with pytest.raises(DreamPoseError, match="from 1 to 1000"):
        prepare(model, synthetic_key_frame(64, 64), synthetic_uv_sequence(2, 64, 64), options)
    with pytest.raises(DreamPoseError, match="finetune_steps"):
        S.EvalSettings(finetune_steps=S.MAX_FINETUNE_STEPS + 1).check()


@pytest.mark.parametrize("argv", [
    ["animate", "--image", "x.png", "--poses", "p", "--out", "o"],
    ["bench"],
    ["eval", "--data", "d", "--dreampose", "m.safetensors", "--out", "o"],
    ["demo", "--out", "o"],
])
def test_every_command_refuses_1001_sampler_steps(argv, capsys):
    argparse_refuses([*argv, "--steps", 1001], capsys, "--steps")


# ----------------------------------------------------------------------------------------- model configs

def huge_channels(config: dict) -> dict:
    return dict(config, block_out_channels=[200000] * len(config["block_out_channels"]))


def test_unet_config_with_huge_channels_is_refused_before_allocating(authors_release, tiny_unet_config, tmp_path):
    from dreampose.loaders.components import load_authors_unet
    from dreampose.loaders.load import convert_authors_checkpoint

    with pytest.raises(DreamPoseError, match=r"does not fit .*config describes .*T weights.*wrong shape"):
        load_authors_unet(authors_release.unet_path, huge_channels(tiny_unet_config))
    out = tmp_path / "c.safetensors"
    with pytest.raises(DreamPoseError, match="does not fit"):
        convert_authors_checkpoint(authors_release.unet_path, str(out), unet_config=huge_channels(tiny_unet_config))
    assert not out.exists()


def test_cli_convert_refuses_a_huge_unet_config(authors_release, tiny_unet_config, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(huge_channels(tiny_unet_config)))
    out = tmp_path / "c.safetensors"
    assert cli.main(["convert", authors_release.unet_path, "--unet-config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not fit" in err[-1] and "Traceback" not in err[-1]   # "converting …" + one line
    assert not out.exists()


@pytest.mark.parametrize("change", [{"layers_per_block": 10 ** 9}, {"transformer_layers_per_block": 10 ** 6},
                                    {"block_out_channels": [32] * 1000}])
def test_config_counts_beyond_any_model_are_refused_before_building(change, authors_release, tiny_unet_config,
                                                                     monkeypatch):
    from diffusers import UNet2DConditionModel

    from dreampose.loaders.components import load_authors_unet

    def refuse(*args, **kwargs):
        raise AssertionError("the UNet was built from an absurd config")
    monkeypatch.setattr(UNet2DConditionModel, "__init__", refuse)
    with pytest.raises(DreamPoseError, match="check the config"):
        load_authors_unet(authors_release.unet_path, dict(tiny_unet_config, **change))


def test_a_fitting_config_still_loads_bit_identical(authors_release, tiny_unet_config):
    from conftest import assert_same_tensors

    from dreampose.loaders.components import load_authors_unet

    unet = load_authors_unet(authors_release.unet_path, tiny_unet_config)
    assert_same_tensors(unet.state_dict(), authors_release.unet_state)


# ----------------------------------------------------------------------------------------- the nodes agree

def _node_max(path: str, name: str) -> list:
    """The literal ``max=`` of every ``io.*.Input(name, ...)`` in a node file (read as text: no ComfyUI needed)."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Input" \
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == name:
            found += [ast.literal_eval(k.value) for k in node.keywords if k.arg == "max"]
    return found


def test_node_widget_maxima_agree_with_the_settings():
    assert _node_max("nodes/finetune.py", "lora_rank") == [S.MAX_LORA_RANK]
    assert _node_max("nodes/finetune.py", "steps") == [S.MAX_FINETUNE_STEPS]
    assert _node_max("nodes/sampler.py", "steps") == [S.MAX_STEPS]
