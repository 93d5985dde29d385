"""Several processes (issue 13, item 7): one video's frames split over processes, and a batch of jobs dealt out
to them, each equal bit for bit to what one process writes.

The multi-process runs are real: two CPU processes started by torchrun, joined by accelerate over gloo, on the
shipped demo model at 64×64 (about ten seconds each). One thread per process in both runs, so the single-
and two-process UNet calls do the same arithmetic.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreampose.cli import batch
from dreampose.cli import main as cli
from dreampose.demo.config import DEMO_FILE
from dreampose.errors import DreamPoseError
from dreampose.pipeline.split import check_split, frame_blocks
from dreampose.settings import SamplingOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 7
COMMON = ["--dreampose", DEMO_FILE, "--width", "64", "--height", "64", "--steps", "2", "--frames-per-batch", "2",
          "--threads", "1", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A key frame and seven pose frames (a box of random UV that moves down a row per frame)."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    os.makedirs(root / "poses")
    for i in range(FRAMES):
        uv = np.zeros((2, 64, 48), np.float32)
        uv[:, 10 + i:50, 12:36] = rng.random((2, 40 - i, 24))
        np.save(root / "poses" / f"frame_{i}_densepose.npy", uv)
    Image.fromarray((rng.random((96, 64, 3)) * 255).astype(np.uint8)).save(root / "key.png")
    return root


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _run(args: list, processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "dreampose", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _pngs(folder) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".png")}


def _tensor(path) -> torch.Tensor:
    return load_file(str(path))["latents"]


# ------------------------------------------------------------------------------------------ the split itself

def test_frame_blocks_are_whole_chunks_in_order_as_even_as_the_chunks_allow():
    assert frame_blocks(7, 2, 2) == [range(0, 4), range(4, 7)]            # chunks 2+2 | 2+1
    assert frame_blocks(7, 2, 3) == [range(0, 4), range(4, 6), range(6, 7)]
    assert frame_blocks(3, 4, 2) == [range(0, 3), range(3, 3)]            # one chunk: the second process idles
    for count in range(1, 30):
        for per_call in range(1, 6):
            for world in range(1, 5):
                blocks = frame_blocks(count, per_call, world)
                assert len(blocks) == world
                assert [f for b in blocks for f in b] == list(range(count))
                chunks = [-(-len(b) // per_call) for b in blocks]
                assert max(chunks) - min(chunks) <= 1 and chunks == sorted(chunks, reverse=True)
                assert all(b.start % per_call == 0 for b in blocks if len(b))   # a UNet call holds what it holds alone


def test_options_whose_chunks_depend_on_each_other_do_not_split():
    check_split(SamplingOptions(sampler="ddim"))
    check_split(SamplingOptions(reference_attention=1.0))   # the photo's rows: the same in every chunk
    with pytest.raises(DreamPoseError, match="'euler_a' draws new noise chunk after chunk"):
        check_split(SamplingOptions(sampler="euler_a"))
    with pytest.raises(DreamPoseError, match="cross-frame attention carries an anchor frame"):
        check_split(SamplingOptions(cross_frame_attention=0.5))


def test_two_processes_write_what_one_process_writes(inputs, tmp_path):
    """Frames 1–5 (a range: the windows reach frames 0 and 6), the clip stretched as a whole, latents saved:
    the PNGs, the MP4 and both latent tensors are bit for bit those of one process."""
    args = ["animate", *COMMON, "--image", inputs / "key.png", "--poses", inputs / "poses", "--frames", "1:6",
            "--stretch", "sequence", "--save-latents"]
    _ok(_run([*args, "--out", tmp_path / "one"]))
    two = _ok(_run([*args, "--out", tmp_path / "two"], processes=2))
    assert "2 processes: frames split in blocks of whole 2-frame chunks (4, 1 frames)" in two.stderr
    assert two.stderr.count("loading weights") == 1                   # the other process says nothing
    one_png, two_png = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert list(one_png) == [f"frame_{i:04d}.png" for i in range(1, 6)]
    assert one_png == two_png
    assert open(tmp_path / "one" / "dreampose.mp4", "rb").read() == open(tmp_path / "two" / "dreampose.mp4",
                                                                          "rb").read()
    for name in ("latents.safetensors", "init_latents.safetensors"):
        assert torch.equal(_tensor(tmp_path / "one" / name), _tensor(tmp_path / "two" / name))
    one_info = json.load(open(tmp_path / "one" / "dreampose_run.json"))
    two_info = json.load(open(tmp_path / "two" / "dreampose_run.json"))
    assert (one_info["processes"], two_info["processes"]) == (1, 2)
    for key in ("frames", "unet_calls", "image_evaluations"):      # the processes' counts add up to one's
        assert one_info[key] == two_info[key]
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))   # no temp, no extra


def test_a_split_refuses_options_that_would_change_the_frames_before_any_work(inputs, tmp_path):
    proc = _run(["animate", *COMMON, "--image", inputs / "key.png", "--poses", inputs / "poses", "--sampler",
                 "euler_a", "--out", tmp_path / "o"], processes=2)
    assert proc.returncode != 0
    assert "'euler_a' draws new noise chunk after chunk" in proc.stderr
    # torchrun itself prints a traceback of its own when a process exits non-zero; none comes from ours
    assert f'File "{REPO}/dreampose' not in proc.stderr and "loading weights" not in proc.stderr
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------------ batch

def _manifest(path, jobs, **extra) -> str:
    with open(path, "w") as f:
        json.dump({"jobs": jobs, **extra}, f)
    return str(path)


def _jobs(inputs):
    """Three jobs: another seed, a frame range, a subject file (the demo model itself, as a full finetune)."""
    return [{"name": "seed1", "image": str(inputs / "key.png"), "poses": str(inputs / "poses"), "seed": 1},
            {"name": "range", "image": str(inputs / "key.png"), "poses": str(inputs / "poses"), "frames": "2:5"},
            {"image": str(inputs / "key.png"), "poses": str(inputs / "poses"), "subject": [DEMO_FILE],
             "save_latents": True}]


def test_every_job_is_the_animate_run_its_keys_name_and_a_rerun_skips_them(inputs, tmp_path):
    manifest = _manifest(tmp_path / "jobs.json", _jobs(inputs))
    out = tmp_path / "batch"
    assert cli.main(["batch", "--manifest", manifest, "--out", str(out), *COMMON]) == 0
    report = json.load(open(out / batch.REPORT_NAME))
    assert [(j["name"], j["status"], j["frames"]) for j in report["jobs"]] == [
        ("seed1", "done", FRAMES), ("range", "done", 3), ("key-poses", "done", FRAMES)]
    same = {"seed1": ["--seed", "1"], "range": ["--frames", "2:5"],
            "key-poses": ["--subject", DEMO_FILE, "--save-latents"]}
    for name, flags in same.items():
        alone = tmp_path / f"alone_{name}"
        assert cli.main(["animate", *COMMON, "--image", str(inputs / "key.png"), "--poses", str(inputs / "poses"),
                         *flags, "--out", str(alone)]) == 0
        assert _pngs(alone) == _pngs(out / name) and _pngs(alone)
        # animate sees the batch's folder as an earlier run of this very job (so it may replace it)
        job = json.load(open(out / name / "dreampose_run.json"))["options"]
        mine = json.load(open(alone / "dreampose_run.json"))["options"]
        assert {**job, "out": None} == {**mine, "out": None}
    assert _pngs(out / "seed1") != _pngs(tmp_path / "alone_range")
    before = {n: os.stat(out / "seed1" / n).st_mtime_ns for n in os.listdir(out / "seed1")}
    shutil.rmtree(out / "range")          # as an interrupted job leaves it: nothing (its files appear together)
    assert cli.main(["batch", "--manifest", manifest, "--out", str(out), *COMMON]) == 0
    report = json.load(open(out / batch.REPORT_NAME))
    assert [j["status"] for j in report["jobs"]] == ["finished earlier", "done", "finished earlier"]
    assert {n: os.stat(out / "seed1" / n).st_mtime_ns for n in os.listdir(out / "seed1")} == before


def test_a_failing_job_leaves_nothing_and_the_others_finish(inputs, tmp_path, tiny_dreampose_file, capsys):
    """A subject file that does not fit the model is found when it is applied: that job fails with its reason,
    writes nothing, the batch goes on and exits 1; the rerun retries only it."""
    jobs = _jobs(inputs)[:2]
    jobs.insert(1, {"name": "misfit", "image": str(inputs / "key.png"), "poses": str(inputs / "poses"),
                    "subject": tiny_dreampose_file})
    manifest = _manifest(tmp_path / "jobs.json", jobs)
    out = tmp_path / "batch"
    assert cli.main(["batch", "--manifest", manifest, "--out", str(out), *COMMON]) == 1
    err = capsys.readouterr()
    assert "job misfit failed:" in err.err and "Traceback" not in err.err
    assert "1 failed (misfit; rerun the same command to retry them)" in err.out
    assert [j["status"] for j in json.load(open(out / batch.REPORT_NAME))["jobs"]] == ["done", "failed", "done"]
    assert not os.path.exists(out / "misfit") or not os.listdir(out / "misfit")
    assert cli.main(["batch", "--manifest", manifest, "--out", str(out), *COMMON]) == 1
    assert [j["status"] for j in json.load(open(out / batch.REPORT_NAME))["jobs"]] == [
        "finished earlier", "failed", "finished earlier"]


@pytest.mark.parametrize("jobs, message", [
    ("not a list", "with at least one job"),
    ([], "with at least one job"),
    ([{"poses": "p"}], "job 1 needs \"image\" and \"poses\""),
    ([{"name": "../up", "image": "k.png", "poses": "p"}], "name '../up' is not a plain folder name"),
    ([{"name": "a", "image": "key.png", "poses": "poses"}, {"name": "a", "image": "key.png", "poses": "poses"}],
     "jobs 1 and 2 are both named 'a'"),
    ([{"image": "key.png", "poses": "poses", "dreampose": "x"}], "\"dreampose\" belongs to the whole batch"),
    ([{"image": "key.png", "poses": "poses", "steps": 0}], "job 1 (key-poses): argument --steps"),
    ([{"image": "key.png", "poses": "poses", "colour": 1}], "unrecognized arguments: --colour 1"),
    ([{"image": "key.png", "poses": "poses"}, {"image": "missing.png", "poses": "poses", "name": "b"}],
     "job 2 (b): --image"),
    ([{"image": "key.png", "poses": "poses", "subject": "key.png"}], "a subject finetune is one of our"),
])
def test_a_bad_manifest_is_one_clear_error_before_any_weights(inputs, tmp_path, capsys, jobs, message):
    manifest = tmp_path / "jobs.json"
    manifest.write_text(json.dumps({"jobs": jobs}) if jobs != "not a list" else '{"jobs": 3}')
    for name in ("key.png", "poses"):                          # paths are relative to the manifest
        os.symlink(inputs / name, tmp_path / name)
    assert cli.main(["batch", "--manifest", str(manifest), "--out", str(tmp_path / "out"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "loading weights" not in err and not os.path.exists(tmp_path / "out")


def test_the_report_never_replaces_the_manifest_or_a_file_no_batch_wrote(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    manifest = _manifest(out / batch.REPORT_NAME, _jobs(inputs)[:1])     # the manifest kept where the report goes
    assert cli.main(["batch", "--manifest", manifest, "--out", str(out), *COMMON, "--force"]) == 2
    assert f"--out {out / batch.REPORT_NAME} is the input --manifest {manifest}: writing there would destroy it" in (
        capsys.readouterr().err)
    assert json.load(open(manifest))["jobs"] == _jobs(inputs)[:1]
    other = tmp_path / "other"
    other.mkdir()
    (other / batch.REPORT_NAME).write_text('{"mine": 1}')
    manifest = _manifest(tmp_path / "jobs.json", _jobs(inputs)[:1])
    assert cli.main(["batch", "--manifest", manifest, "--out", str(other), *COMMON]) == 2
    assert (f"--out {other / batch.REPORT_NAME} already exists and this command did not write it for this job; "
            "pass --force") in capsys.readouterr().err
    assert (other / batch.REPORT_NAME).read_text() == '{"mine": 1}'


def test_a_job_folder_holding_another_run_is_refused_unless_forced(inputs, tmp_path, capsys):
    manifest = _manifest(tmp_path / "jobs.json", _jobs(inputs)[:1])
    os.makedirs(tmp_path / "out" / "seed1")
    (tmp_path / "out" / "seed1" / "frame_0000.png").write_bytes(b"someone else's")
    assert cli.main(["batch", "--manifest", manifest, "--out", str(tmp_path / "out"), *COMMON]) == 2
    assert "already holds frame_0000.png from another run; pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "seed1" / "frame_0000.png").read_bytes() == b"someone else's"
    assert cli.main(["batch", "--manifest", manifest, "--out", str(tmp_path / "out"), *COMMON, "--force"]) == 0


def test_two_processes_share_the_jobs_and_write_what_one_writes(inputs, tmp_path):
    manifest = _manifest(tmp_path / "jobs.json", _jobs(inputs))
    _ok(_run(["batch", "--manifest", manifest, "--out", tmp_path / "one", *COMMON]))
    two = _ok(_run(["batch", "--manifest", manifest, "--out", tmp_path / "two", *COMMON], processes=2))
    assert "3 to do over 2 processes" in two.stderr
    assert "[process 0] job 1/2: seed1" in two.stderr and "[process 1] job 1/1: range" in two.stderr
    for name in ("seed1", "range", "key-poses"):
        assert _pngs(tmp_path / "one" / name) == _pngs(tmp_path / "two" / name)
    assert torch.equal(_tensor(tmp_path / "one" / "key-poses" / "latents.safetensors"),
                       _tensor(tmp_path / "two" / "key-poses" / "latents.safetensors"))
    report = json.load(open(tmp_path / "two" / batch.REPORT_NAME))
    assert report["processes"] == 2 and [j["status"] for j in report["jobs"]] == ["done"] * 3
