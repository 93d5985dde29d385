"""One source for every default (``dreampose/settings.py``): the command line, the nodes and
``docs/settings.md`` must all say what the settings say."""
from __future__ import annotations

import dataclasses
import json

import pytest

from dreampose import settings as S
from dreampose.errors import DreamPoseError
from dreampose.cli import finetune as cli_finetune
from dreampose.cli.common import add_options, options_from_args
from dreampose.cli.main import build_parser
from host_helpers import COMFY_DIR, ROOT, Env, log


def parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def test_demo_sampling_flags_default_to_the_settings():
    args = parse("demo")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(S.SamplingOptions)}
    assert given == dataclasses.asdict(S.DEMO_SAMPLING)
    assert args.fps == S.DEMO_FPS


@pytest.mark.parametrize("preset, flags, want", [
    (None, [], S.DEFAULT_SAMPLING),
    ("paper", [], S.PAPER_SAMPLING),
    ("fast", [], S.FAST_SAMPLING),
    ("paper", ["--steps", 7, "--s-image", 5], S.PAPER_SAMPLING.replace(steps=7, s_image=5.0)),
    (None, ["--sampler", "unipc"], S.DEFAULT_SAMPLING.replace(sampler="unipc")),
])
def test_animate_takes_a_preset_and_the_flags_given_on_top(preset, flags, want):
    from dreampose.cli.animate import sampling_options

    argv = ["animate", "--image", "x.png", "--poses", "p", "--out", "o", *flags]
    args = parse(*argv, *(["--preset", preset] if preset else []))
    assert sampling_options(args, S.DEFAULT_SAMPLING) == want
    assert args.fps == S.ANIMATE_FPS


@pytest.mark.parametrize("command, kind", [("finetune-subject", "subject"), ("finetune-vae", "vae")])
def test_finetune_flags_default_to_the_kinds_settings(command, kind):
    extra = ["--poses", "p"] if kind == "subject" else []
    args = parse(command, "--images", "a.png", "--out", "o.safetensors", *extra)
    assert cli_finetune.settings_of(args, kind) == S.finetune_defaults(kind)
    args = parse(command, "--images", "a.png", "--out", "o.safetensors", *extra, "--steps", 7, "--no-crop")
    assert cli_finetune.settings_of(args, kind) == dataclasses.replace(S.finetune_defaults(kind), steps=7,
                                                                       crop=False)
    assert S.finetune_defaults("vae", "paper").steps == S.VAE_FINETUNE_DEFAULTS["steps"] != S.FinetuneSettings().steps
    args = parse(command, "--images", "a.png", "--out", "o.safetensors", *extra, "--preset", "paper")
    assert cli_finetune.settings_of(args, kind) == S.finetune_defaults(kind, "paper")
    assert S.finetune_defaults("subject", "paper") == S.FinetuneSettings()


def test_decoder_loss_and_blend_flags_reach_the_vae_settings_only():
    args = parse("finetune-vae", "--images", "a.png", "--out", "o.safetensors", "--decoder-loss", "l1",
                 "--decoder-blend", 0.6)
    assert cli_finetune.settings_of(args, "vae") == dataclasses.replace(S.finetune_defaults("vae"),
                                                                        decoder_loss="l1", decoder_blend=0.6)
    with pytest.raises(DreamPoseError, match=r"decoder_blend must be a number in \(0, 1\] \(got 0.0;"):
        cli_finetune.settings_of(parse("finetune-vae", "--images", "a.png", "--out", "o.safetensors",
                                       "--decoder-blend", 0), "vae")
    with pytest.raises(SystemExit):
        parse("finetune-subject", "--images", "a.png", "--poses", "p", "--out", "o.safetensors", "--decoder-loss", "l1")


def test_finetune_help_shows_each_kinds_defaults(capsys):
    for command, kind in (("finetune-subject", "subject"), ("finetune-vae", "vae")):
        with pytest.raises(SystemExit):
            parse(command, "--help")
        text = " ".join(capsys.readouterr().out.split())
        d = S.finetune_defaults(kind)
        assert f"optimizer steps (default {d.steps})" in text and f"(default {d.lr:g})" in text


def test_train_flags_default_to_the_settings():
    args = parse("train", "--data", "d", "--out", "o")
    given = {o.name: getattr(args, o.name) for o in S.options_of(S.TrainConfig) if o.flag}
    assert given.pop("mixed_precision") is None   # left to `accelerate launch`, else "no"
    want = dataclasses.asdict(S.TrainConfig(data=["d"], out="o"))
    assert given == {k: v for k, v in want.items() if k in given}
    assert set(want) - set(given) == {"mixed_precision", "weight_decay", "max_grad_norm"}


@pytest.mark.parametrize("argv, cls", [
    (["eval", "--data", "d", "--dreampose", "m.safetensors", "--out", "o"], S.EvalSettings),
    (["prepare", "src", "--out", "o"], S.PrepareOptions),
    (["synth", "--out", "o"], S.SynthSettings),
    (["bench"], S.BenchSettings),
])
def test_other_commands_default_to_the_settings(argv, cls):
    args = parse(*argv)
    given = {o.name: getattr(args, o.name) for o in S.options_of(cls) if o.flag}
    assert given == {k: v for k, v in dataclasses.asdict(cls()).items() if k in given}
    assert options_from_args(args, cls()) == cls()


def test_option_builder_follows_the_settings_it_is_given():
    """A changed default, a new choice or a lower bound in the settings reaches the flags with no other edit."""
    import argparse

    @dataclasses.dataclass
    class Probe:
        steps: int = S.option(7, "steps (default {default})", minimum=2)
        mode: str = S.option("b", "mode", choices=("a", "b", "c"))

    p = argparse.ArgumentParser()
    add_options(p, Probe)
    assert vars(p.parse_args([])) == {"steps": 7, "mode": "b"}
    assert "steps (default 7)" in p.format_help()
    for bad in (["--steps", "1"], ["--mode", "d"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_settings_doc_is_current():
    path = ROOT / "docs" / "settings.md"
    assert path.read_text() == S.markdown(), "stale: python -m dreampose.settings > docs/settings.md"
    for cls in S.SETTINGS_CLASSES:
        assert f"## `{cls.__name__}`" in path.read_text()


# ------------------------------------------------------------------------------------------ the nodes

def _defaults(node_info: dict) -> dict:
    inputs = {**node_info["input"]["required"], **node_info["input"].get("optional", {})}
    return {k: v[1].get("default") for k, v in inputs.items() if len(v) > 1 and isinstance(v[1], dict)}


def _options(node_info: dict, name: str) -> list:
    spec = {**node_info["input"]["required"], **node_info["input"].get("optional", {})}[name]
    return spec[1]["options"] if isinstance(spec[1], dict) and "options" in spec[1] else spec[0]


@pytest.mark.host
def test_node_defaults_and_choices_are_the_settings(tmp_path):
    if COMFY_DIR is None:
        pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh (scripts/test.sh does)")
    oi_path = tmp_path / "oi.json"
    proc = Env(tmp_path).run("settings", None, "--object-info", str(oi_path))
    assert proc.returncode == 0, log(proc)
    oi = json.loads(oi_path.read_text())
    p = S.DEFAULT_SAMPLING
    sampler = _defaults(oi["DualCFGSampler"])
    assert _options(oi["DualCFGSampler"], "preset") == ["widgets", *S.SAMPLING_PRESETS]
    assert (sampler["guidance_start"], sampler["guidance_end"]) == (p.guidance_start, p.guidance_end)
    assert {k: sampler[k] for k in ("s_image", "s_pose", "steps", "sampler", "seed", "frames_per_batch", "start",
                                     "stretch")} == {k: getattr(p, k) for k in ("s_image", "s_pose", "steps",
                                                                                "sampler", "seed", "frames_per_batch",
                                                                                "start", "stretch")}
    assert _options(oi["DualCFGSampler"], "sampler") == list(S.SAMPLERS)
    assert _options(oi["DualCFGSampler"], "start") == list(S.START_MODES)
    assert _options(oi["DualCFGSampler"], "stretch") == list(S.STRETCH_MODES)
    window = _defaults(oi["DensePoseWindow5"])
    assert (window["width"], window["height"]) == (p.width, p.height)
    encode = _defaults(oi["CLIPVAEAdapterEncode"])
    assert (encode["conditioning_latent"], encode["seed"]) == (p.conditioning_latent, p.seed)
    assert _options(oi["CLIPVAEAdapterEncode"], "conditioning_latent") == list(S.LATENT_MODES)
    for node_id, kind in (("SubjectFinetune", "subject"), ("VAEDecoderFinetune", "vae")):
        d = dataclasses.asdict(S.finetune_defaults(kind))
        got = _defaults(oi[node_id])
        trained = {k: v for k, v in got.items() if k in d}
        assert trained == {k: d[k] for k in trained}, node_id
        assert _options(oi[node_id], "precision") == list(S.PRECISIONS)
    assert set(_defaults(oi["SubjectFinetune"])) >= {"steps", "lr", "seed", "crop", "flip", "gradient_checkpointing",
                                                      "precision", "optimizer", "lora_rank"}
    assert _options(oi["SubjectFinetune"], "optimizer") == list(S.OPTIMIZERS)
    estimate = _defaults(oi["DreamPoseDensePose"])
    prep = S.PrepareOptions()
    assert (estimate["person"], estimate["frames_per_batch"], estimate["detect_resolution"]) == (
        prep.person, prep.frames_per_batch, prep.detect_resolution)
    assert _options(oi["DreamPoseDensePose"], "person") == list(S.PERSON_CHOICES)
    loader = oi["LoadDreamPose"]
    assert _options(loader, "dtype") == list(S.NODE_DTYPE_CHOICES)
    assert _options(loader, "vae_dtype") == list(S.VAE_DTYPE_CHOICES)
    assert _options(loader, "convention") == ["auto", *S.CONVENTIONS]
    person = _defaults(oi["DreamPoseSyntheticPerson"])
    assert (person["frames"], person["width"], person["height"]) == (S.DEMO_FRAMES, S.DEMO_WIDTH, S.DEMO_HEIGHT)
    assert _options(oi["DreamPoseSyntheticPerson"], "motion") == list(S.MOTIONS)
