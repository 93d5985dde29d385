"""The command line (`python -m dreampose`), the video writer and the benchmark, on tiny models.

Model files come from conftest's session fixtures (our format written by ``DreamPoseModel.save``
with its VAE, CLIP by ``write_tiny_clip_folder``), loaded through the real loaders by the CLI.
Runs are kept small (128×192 pixels, 3 frames, 3 steps) so the whole file takes seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreampose.cli import main as cli
from dreampose.cli.animate import INIT_LATENTS_NAME, LATENTS_NAME, VIDEO_NAME
from dreampose.cli.common import RUN_INFO_NAME
from dreampose.pipeline.video import save_png_frames, save_video, write_mp4
from dreampose.settings import DEFAULT_SAMPLING

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H, FRAMES, STEPS, FPB = 128, 192, 3, 3, 2


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


# ---------------------------------------------------------------------------------------- inputs

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A key frame PNG (RGBA, to check it is converted) and 3 pose files at a size unlike the output."""
    folder = tmp_path_factory.mktemp("cli_inputs")
    from dreampose.data.synthetic import synthetic_key_frame, synthetic_uv_sequence

    key = synthetic_key_frame(300, 240).permute(1, 2, 0).numpy()
    rgba = np.concatenate([key, np.full(key.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    image = str(folder / "key.png")
    Image.fromarray(rgba, "RGBA").save(image)
    poses = folder / "poses"
    poses.mkdir()
    for i, uv in enumerate(synthetic_uv_sequence(FRAMES, 100, 80).numpy()):
        np.save(poses / f"frame_{i + 10}_densepose.npy", uv.astype(np.float64))  # float64, as DensePose wrote
    return {"image": image, "poses": str(poses)}


def animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, out, *extra):
    return ["animate", "--dreampose", tiny_dreampose_file, "--clip", tiny_clip_folder, "--image", inputs["image"],
            "--poses", inputs["poses"], "--width", W, "--height", H, "--steps", STEPS, "--frames-per-batch", FPB,
            "--out", out, "--quiet", "--threads", 1, *extra]


def read_frames(folder) -> np.ndarray:
    names = sorted(n for n in os.listdir(folder) if n.startswith("frame_") and n.endswith(".png"))
    return np.stack([np.asarray(Image.open(os.path.join(folder, n))) for n in names])


def final_latents(folder) -> torch.Tensor:
    return load_file(os.path.join(folder, LATENTS_NAME))["latents"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_dreampose_file, tiny_clip_folder, inputs):
    """Seed 1 with --save-latents: the reference run the reproducibility tests compare against."""
    out = str(tmp_path_factory.mktemp("run_a"))
    assert run_cli(*animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, out, "--seed", 1,
                                 "--save-latents")) == 0
    return out


# ---------------------------------------------------------------------------------------- demo

def test_demo_subprocess_runs_end_to_end_with_the_shipped_model(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "dreampose", "demo", "--out", str(out), "--finetune-steps", "3",
                           "--vae-finetune-steps", "3"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained with `python -m dreampose train` on the synthetic world" in proc.stdout
    assert "pose alignment: IoU" in proc.stdout
    assert "subject finetune on the key frame: 3 UNet+adapter and 3 VAE-decoder steps" in proc.stdout
    frames = read_frames(out)
    assert frames.shape == (16, 192, 128, 3)  # the demo's defaults: the size the demo model was trained at
    cap = cv2.VideoCapture(str(out / VIDEO_NAME))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 16
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (128, 192)
    cap.release()
    # its synthetic inputs are written in the authors' layout, so `animate` can be tried on them
    assert sorted(os.listdir(out / "poses"), key=lambda n: int(n.split("_")[1])) == \
        [f"frame_{i}_densepose.npy" for i in range(16)]
    assert np.load(out / "poses" / "frame_0_densepose.npy").shape == (2, 192, 128)


# ---------------------------------------------------------------------------------------- animate

def test_animate_writes_frames_video_and_latents(run_a):
    frames = read_frames(run_a)
    assert frames.shape == (FRAMES, H, W, 3) and frames.dtype == np.uint8
    assert frames.std() > 1  # something was drawn
    cap = cv2.VideoCapture(os.path.join(run_a, VIDEO_NAME))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    cap.release()
    assert final_latents(run_a).shape == (FRAMES, 4, H // 8, W // 8)
    assert load_file(os.path.join(run_a, INIT_LATENTS_NAME))["latents"].shape == (FRAMES, 4, H // 8, W // 8)
    info = json.load(open(os.path.join(run_a, RUN_INFO_NAME)))
    assert info["unet_calls"] == STEPS * 2   # default dpmpp_2m: one call per step per chunk, 3 frames in chunks of 2
    assert info["image_evaluations"] == STEPS * 3 * FRAMES     # s_I 8, s_p 3: three branches every step
    assert info["sampling"]["sampler"] == DEFAULT_SAMPLING.sampler
    assert info["convention"] == "standard"       # taken from the file's metadata


def test_cli_x_t_equals_the_library_default_path(run_a, tiny_dreampose_file, tiny_clip_folder, inputs):
    """The CLI builds x_T itself (to save it) and injects it; that must equal sample() building it."""
    from dreampose.pipeline.conditioning import encode_image_condition
    from dreampose.loaders.load import load_dreampose
    from dreampose.pipeline.poses import load_uv_folder, make_pose_windows
    from dreampose.pipeline.sampling import sample
    model = load_dreampose(clip=tiny_clip_folder, dreampose=tiny_dreampose_file)
    g = torch.Generator().manual_seed(1)
    image = torch.from_numpy(np.asarray(Image.open(inputs["image"]).convert("RGB")).copy()).permute(2, 0, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI run (--threads 1): same reduction order, so bit-equal results
    try:
        cond = encode_image_condition(model, image, generator=g)
        poses = make_pose_windows(load_uv_folder(inputs["poses"]), H, W)
        want = sample(model, cond, poses, DEFAULT_SAMPLING.replace(width=W, height=H, steps=STEPS,
                                                                   frames_per_batch=FPB), generator=g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(final_latents(run_a), want)


def test_saved_x_t_reproduces_the_run_and_the_seed_matters(run_a, tmp_path, tiny_dreampose_file,
                                                           tiny_clip_folder, inputs):
    def args(out, *extra):
        return animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, out, *extra)

    init = os.path.join(run_a, INIT_LATENTS_NAME)
    same = str(tmp_path / "same")
    assert run_cli(*args(same, "--seed", 1, "--init-latents", init, "--save-latents")) == 0
    assert torch.equal(final_latents(same), final_latents(run_a))
    assert np.array_equal(read_frames(same), read_frames(run_a))

    other = str(tmp_path / "other_seed")
    assert run_cli(*args(other, "--seed", 2, "--save-latents")) == 0
    assert not torch.equal(load_file(os.path.join(other, INIT_LATENTS_NAME))["latents"],
                           load_file(init)["latents"])
    assert (final_latents(other) - final_latents(run_a)).abs().max() > 1e-2


def test_with_deterministic_conditioning_x_t_alone_decides(run_a, tmp_path, tiny_dreampose_file,
                                                           tiny_clip_folder, inputs):
    """mean VAE latent + DDIM (eta 0): the seed only feeds x_T, so an injected x_T overrides any seed."""
    det = ("--conditioning-latent", "mode", "--sampler", "ddim", "--save-latents")
    init = os.path.join(run_a, INIT_LATENTS_NAME)
    runs = {}
    for name, extra in {"inj5": ("--seed", 5, "--init-latents", init), "inj6": ("--seed", 6, "--init-latents", init),
                        "own5": ("--seed", 5)}.items():
        runs[name] = str(tmp_path / name)
        assert run_cli(*animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, runs[name], *det, *extra)) == 0
    assert torch.equal(final_latents(runs["inj5"]), final_latents(runs["inj6"]))
    assert (final_latents(runs["inj5"]) - final_latents(runs["own5"])).abs().max() > 1e-2


def test_animate_with_the_authors_files_runs_in_official_mode(authors_release, tiny_clip_folder, inputs, tmp_path,
                                                             tiny_unet_config, tiny_vae_config):
    """unet_epoch_N.pth (adapter found beside it) + vae_N.pth, as the authors released them."""
    out = str(tmp_path / "authors")
    ucfg, vcfg = tmp_path / "unet.json", tmp_path / "vae.json"   # tiny sizes; real files are SD 1.x sized
    ucfg.write_text(json.dumps(tiny_unet_config))
    vcfg.write_text(json.dumps(tiny_vae_config))
    args = animate_args(authors_release.unet_path, tiny_clip_folder, inputs, out, "--vae", authors_release.vae_path,
                        "--unet-config", ucfg, "--vae-config", vcfg, "--max-frames", 2, "--stretch", "per_frame")
    assert run_cli(*args) == 0
    frames = read_frames(out)
    assert frames.shape == (2, H, W, 3)
    assert all(f.min() == 0 and f.max() == 255 for f in frames)   # the authors' per-frame stretch
    assert json.load(open(os.path.join(out, RUN_INFO_NAME)))["convention"] == "official"


# ---------------------------------------------------------------------------------------- bad input

@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to load weights fails the test: input errors must come first."""
    import dreampose.loaders.load

    def refuse(**kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr(dreampose.loaders.load, "load_dreampose", refuse)


@pytest.mark.parametrize("change, message", [
    ({"--width": 500}, "not a multiple of 64"),
    ({"--poses": "MISSING"}, "--poses: not found"),
    ({"--image": "MISSING"}, "--image: not found"),
    ({"--dreampose": "MISSING"}, "--dreampose: not found"),
    ({"--init-latents": "WRONG_SHAPE"}, "does not fit this run"),
])
def test_bad_input_exits_2_with_one_clear_line_before_loading(change, message, no_weight_loading, capsys,
                                                              tmp_path, tiny_dreampose_file, tiny_clip_folder,
                                                              inputs):
    args = animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, str(tmp_path / "out"))
    for flag, value in change.items():
        if value == "MISSING":
            value = str(tmp_path / "does-not-exist")
        elif value == "WRONG_SHAPE":
            value = str(tmp_path / "x_t.safetensors")
            from safetensors.torch import save_file
            save_file({"latents": torch.zeros(1, 4, 8, 8)}, value)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("dreampose animate: error:")
    assert not os.path.exists(tmp_path / "out" / "frame_0000.png")


def test_argparse_rejects_unknown_choices_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["animate", "--sampler", "lms", "--image", "x", "--poses", "y", "--out", "z"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- convert

def test_convert_authors_files_to_our_format(authors_release, tiny_unet_config, tiny_vae_config, tmp_path,
                                             capsys):
    from dreampose.loaders.load import load_dreampose_file

    ucfg, vcfg = tmp_path / "unet.json", tmp_path / "vae.json"
    ucfg.write_text(json.dumps(tiny_unet_config))
    vcfg.write_text(json.dumps(tiny_vae_config))
    out = str(tmp_path / "converted.safetensors")
    assert run_cli("convert", authors_release.unet_path, "--vae", authors_release.vae_path, "--out", out,
                   "--unet-config", ucfg, "--vae-config", vcfg) == 0
    assert "wrote" in capsys.readouterr().out
    unet, adapter, vae, meta = load_dreampose_file(out)
    assert meta["convention"] == "official"
    for got, want in ((unet, authors_release.unet_state), (adapter, authors_release.adapter_state),
                      (vae, authors_release.vae_state)):
        state = got.state_dict()
        assert sorted(state) == sorted(want) and all(torch.equal(state[k], want[k]) for k in want)
    assert run_cli("convert", authors_release.unet_path, "--out", str(tmp_path / "x.pth")) == 2


# ---------------------------------------------------------------------------------------- bench

def test_bench_prints_sane_json(capsys):
    assert run_cli("bench", "--width", 64, "--height", 64, "--frames", 4, "--frames-per-batch", 2,
                   "--steps", 3, "--repeats", 2, "--quiet", "--threads", 1) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "tiny" and data["device"] == "cpu" and data["dtype"] == "fp32"
    assert data["timesteps"] == 4                          # PNDM: steps + 1 (official: 101 for 100)
    assert data["unet_calls_per_frame"] == data["timesteps"] / 2
    assert data["unet_batch"] == 6
    assert data["image_evaluations_per_frame"] == data["timesteps"] * 3
    calls = data["encoder_calls"]
    assert calls["encoder_calls_in_denoising_loop"] == 0 and calls["encoder_calls_per_step"] == 0
    assert calls["clip_forwards_per_sample"] == 0 and calls["vae_encodes_per_sample"] == 1  # x_T only
    assert calls["clip_forwards_encoding_subject"] == 1 and calls["vae_encodes_encoding_subject"] == 2
    assert data["seconds_per_frame"] > 0 and data["bare_unet_forward_seconds"] > 0
    assert 0.5 < data["overhead_ratio"] < 20 and 0.5 < data["loop_overhead_ratio"] < 20
    assert data["peak_memory_bytes"] > 0 and data["size"] == "64x64"


# ---------------------------------------------------------------------------------------- video

def test_video_writer_keeps_rgb_order_and_leaves_no_temp_files(tmp_path):
    frames = torch.zeros(2, 64, 128, 3)
    frames[0, ..., 0] = 1.0        # red
    frames[1, ..., 2] = 1.0        # blue
    pngs, mp4 = save_video(frames, str(tmp_path), fps=5)
    assert [os.path.basename(p) for p in pngs] == ["frame_0000.png", "frame_0001.png"]
    assert tuple(np.asarray(Image.open(pngs[0]))[0, 0]) == (255, 0, 0)
    cap = cv2.VideoCapture(mp4)
    ok, first_bgr = cap.read()
    assert ok and first_bgr.shape == (64, 128, 3)
    assert first_bgr[32, 64, 2] > 200 and first_bgr[32, 64, 0] < 60   # red comes back red
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    cap.release()
    assert sorted(os.listdir(tmp_path)) == ["dreampose.mp4", "frame_0000.png", "frame_0001.png"]
    with pytest.raises(ValueError, match="fps"):
        write_mp4(frames, str(tmp_path / "x.mp4"), fps=0)
    with pytest.raises(ValueError, match=r"\[F,H,W,3\]"):
        save_png_frames(torch.zeros(2, 3, 8, 8), str(tmp_path))


def test_animate_frames_range_writes_those_frames_of_the_whole_run(tmp_path, tiny_dreampose_file, tiny_clip_folder,
                                                                  inputs, capsys):
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    common = ("--sampler", "ddim", "--frames-per-batch", 1)
    assert run_cli(*animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, whole, *common)) == 0
    assert run_cli(*animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, part, *common, "--frames", "1:")) == 0
    names = sorted(n for n in os.listdir(part) if n.endswith(".png"))
    assert names == ["frame_0001.png", "frame_0002.png"]          # the files keep their frame numbers
    for n in names:
        assert np.array_equal(np.asarray(Image.open(os.path.join(part, n))),
                              np.asarray(Image.open(os.path.join(whole, n))))
    cap = cv2.VideoCapture(os.path.join(part, VIDEO_NAME))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    cap.release()
    capsys.readouterr()
    assert run_cli(*animate_args(tiny_dreampose_file, tiny_clip_folder, inputs, str(tmp_path / "none"),
                                 "--frames", "5:9")) == 2
    assert "selects no frame of the 3 pose frame(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["animate", "--image", "x", "--poses", "y", "--out", "z", "--frames", "3"])
