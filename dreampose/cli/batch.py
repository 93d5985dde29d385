"""``python -m dreampose batch``: many animations (subjects × motions) from one manifest, the weights loaded once.

Each job of the manifest is an ``animate`` run: its keys are ``animate``'s flags (``image``, ``poses``,
``subject``, ``frames``, ``seed``, ``steps`` …), on top of the sampling flags given to ``batch``, and it
writes what ``animate --out OUT/NAME`` would, run record included. So the batch resumes per job: a job whose
folder holds its own finished record is skipped, an interrupted one starts again (its files appear together
or not at all). Under ``torchrun --nproc_per_node N -m dreampose batch …`` (or ``accelerate launch``) the
jobs still to do are dealt out to the processes; ``--out`` must then be a folder every process can see.
Every job is checked before any weights are read.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time

from ..errors import DreamPoseError
from ..settings import ANIMATE_FPS, DEFAULT_SAMPLING
from .common import add_device_args, add_weight_args, err

REPORT_NAME = "batch.json"
# job keys that belong to the whole batch (the weights are loaded once, the output folder is the job's name)
BATCH_ONLY = ("dreampose", "base", "clip", "adapter", "vae", "convention", "unet_config", "vae_config", "out",
              "device", "dtype", "threads", "quiet", "force")
PATH_KEYS = ("image", "poses", "subject", "init_latents")        # relative to the manifest's folder
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def register(sub) -> None:
    from .animate import add_sampling_args

    p = sub.add_parser("batch", help="many animations (subjects × motions) from a JSON manifest, resumable per job",
                       description="A manifest of jobs, each a set of `animate` flags, → OUT/NAME/ per job (what "
                                   "`animate` writes). The weights load once; finished jobs are skipped on a rerun; "
                                   "several processes (torchrun / accelerate launch) share the jobs.")
    p.add_argument("--manifest", required=True, metavar="JOBS.json",
                   help='{"jobs": [{"name": "ann_walk", "image": "ann.png", "poses": "walk/", "subject": '
                        '["ann.safetensors"], "seed": 1, "frames": "0:32"}, …], "defaults": {…}}: each job\'s keys '
                        "are animate's flags (paths relative to the manifest); \"defaults\" apply to every job")
    p.add_argument("--out", required=True, help="folder of the jobs' folders (OUT/NAME) and the batch report")
    add_weight_args(p)
    add_sampling_args(p, DEFAULT_SAMPLING, ANIMATE_FPS, presets=True)
    add_device_args(p)
    p.set_defaults(func=run)


class _JobParser(argparse.ArgumentParser):
    """animate's flags, raising instead of exiting (a bad job is a one-line error naming the job)."""

    def error(self, message):
        raise DreamPoseError(message)


def _job_parser() -> argparse.ArgumentParser:
    from .animate import add_job_args, add_sampling_args

    p = _JobParser(prog="job", add_help=False)
    add_job_args(p)
    add_sampling_args(p, DEFAULT_SAMPLING, ANIMATE_FPS, presets=True)
    return p


def read_manifest(path: str) -> list[dict]:
    """The manifest's jobs, ``defaults`` merged in and paths made absolute (checked: a list of objects)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DreamPoseError(f"--manifest {path}: not a readable JSON file ({exc})") from exc
    if isinstance(data, list):
        data = {"jobs": data}
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise DreamPoseError(f"--manifest {path}: give {{\"jobs\": [{{\"image\": …, \"poses\": …}}, …]}} with at "
                             "least one job")
    defaults = data.get("defaults", {})
    unknown = sorted(set(data) - {"jobs", "defaults"})
    if not isinstance(defaults, dict) or unknown:
        raise DreamPoseError(f"--manifest {path}: " + (f"unknown key(s) {', '.join(unknown)} (jobs, defaults)"
                                                        if unknown else "\"defaults\" must be an object"))
    here = os.path.dirname(os.path.abspath(path))
    jobs = []
    for i, job in enumerate(data["jobs"]):
        if not isinstance(job, dict):
            raise DreamPoseError(f"--manifest {path}: job {i + 1} is not an object of animate flags")
        job = {**defaults, **job}
        for key in PATH_KEYS:
            if isinstance(job.get(key), str):
                job[key] = os.path.join(here, os.path.expanduser(job[key]))
            elif isinstance(job.get(key), list):
                job[key] = [os.path.join(here, os.path.expanduser(v)) if isinstance(v, str) else v for v in job[key]]
        jobs.append(job)
    return jobs


def job_name(job: dict, index: int, manifest: str) -> str:
    name = job.get("name")
    if name is None:
        if not isinstance(job.get("image"), str) or not isinstance(job.get("poses"), str):
            raise DreamPoseError(f"--manifest {manifest}: job {index + 1} needs \"image\" and \"poses\"")
        name = (os.path.splitext(os.path.basename(job["image"]))[0] + "-"
                + os.path.basename(os.path.normpath(job["poses"])))
    if not isinstance(name, str) or not NAME.match(name):
        raise DreamPoseError(f"--manifest {manifest}: job {index + 1}: name {name!r} is not a plain folder name "
                             "(letters, digits, . _ + -; up to 128)")
    return name


def job_argv(job: dict, where: str) -> list[str]:
    """A job's keys as animate's flags (``True`` a bare flag, lists repeated)."""
    argv = []
    for key, value in job.items():
        if key == "name" or value is None or value is False:
            continue
        if key in BATCH_ONLY:
            raise DreamPoseError(f"{where}: \"{key}\" belongs to the whole batch (give --{key.replace('_', '-')} to "
                                 "the batch command)")
        flag = "--frames" if key == "frames" else f"--{key.replace('_', '-')}"
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (dict, list)):
                raise DreamPoseError(f"{where}: \"{key}\" must be a value or a list of values")
            argv += [flag] if v is True else [flag, str(v)]
    return argv


def job_args(batch_args, job: dict, name: str, where: str):
    """The namespace ``animate --out OUT/NAME`` would have for this job: the batch's weights and sampling flags,
    the job's keys over them."""
    args = copy.copy(batch_args)
    for key in ("manifest", "func"):
        delattr(args, key)
    args.command = "animate"
    args.subject = None
    try:
        _job_parser().parse_args(job_argv(job, where) + ["--out", os.path.join(batch_args.out, name)], args)
    except DreamPoseError as exc:
        raise DreamPoseError(f"{where}: {exc}") from None
    args.subject = args.subject or None
    return args


def plan(batch_args) -> list[tuple[str, argparse.Namespace]]:
    """Every job as (name, animate namespace), each checked as ``animate`` checks its inputs (files read and
    dropped again), before any weights."""
    from .animate import check_job

    jobs = read_manifest(batch_args.manifest)
    planned, seen = [], {}
    for i, job in enumerate(jobs):
        name = job_name(job, i, batch_args.manifest)
        if name in seen:
            raise DreamPoseError(f"--manifest {batch_args.manifest}: jobs {seen[name] + 1} and {i + 1} are both "
                                 f"named {name!r}; give each job its own \"name\"")
        seen[name] = i
        where = f"--manifest {batch_args.manifest}: job {i + 1} ({name})"
        args = job_args(batch_args, job, name, where)
        try:
            check_job(args)
        except DreamPoseError as exc:
            raise DreamPoseError(f"{where}: {exc}") from None
        args.init_latents_tensor = None
        planned.append((name, args))
    return planned


def _is_batch_report(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return set(json.load(f)) == {"manifest", "processes", "jobs"}
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def check_report(args) -> None:
    """OUT/batch.json may be written: never over the manifest, over another file only with ``--force``
    (a report of an earlier batch is this command's own)."""
    from ..files.destinations import check_output_file

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DreamPoseError(f"--out {args.out} is a file; give a folder")
    check_output_file(os.path.join(args.out, REPORT_NAME), "--out", inputs=[("--manifest", args.manifest)],
                      force=args.force, ours=_is_batch_report)


def finished(args) -> bool:
    """The job's folder holds its own finished run (the record is written last, with every file)."""
    from .common import RUN_INFO_NAME, same_run

    return os.path.isfile(os.path.join(args.out, RUN_INFO_NAME)) and same_run(args)(args.out)


def run_job(model, args, device, dtype) -> int:
    """One job through animate's steps 1 and 3 on the loaded model (its subject finetunes applied to a copy that
    goes with the job); returns its frame count."""
    from ..files.atomic import output_set
    from ..loaders.subject_file import apply_subject
    from .animate import check_job, render, summary, write_animation, write_run_info

    options, image, uv, _ = check_job(args)
    for path in args.subject or ():
        model = apply_subject(model, path)
    clip = render(model, image, uv, options, args, quiet=args.quiet)
    with output_set():
        result = write_animation(clip, uv, options, args)
        result.pop("video")
        write_run_info(args, options, result, device, dtype, {"convention": model.convention, "batch": True})
    if not args.quiet:
        summary(result, args, options, device, dtype, None)
    return result["frames"]


def run(args) -> int:
    import torch

    from ..files.atomic import write_text_atomic
    from ..models.devices import resolve_device, resolve_dtype
    from .animate import check_weight_paths, join_processes
    from .common import load_model

    # 1. the weights' paths and every job, before any weights are read
    check_weight_paths(args)
    check_report(args)
    jobs = plan(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    processes, device = join_processes(args, device)
    tag = f"[process {processes.rank}] " if processes.world > 1 else ""
    say = err if processes.is_main else (lambda msg: None)

    # 2. what is left to do, dealt out once every process has looked (a job done meanwhile is not counted twice)
    todo = [i for i, (_, a) in enumerate(jobs) if not finished(a)]
    processes.wait()
    say(f"{len(jobs)} job(s) in {args.manifest}: {len(jobs) - len(todo)} finished earlier, {len(todo)} to do"
        + (f" over {processes.world} processes" if processes.world > 1 else ""))
    mine = todo[processes.rank::processes.world]
    status = torch.zeros(len(jobs), dtype=torch.int64)      # 0 finished earlier, 1 done now, 2 failed
    frames = torch.zeros(len(jobs), dtype=torch.int64)
    model = None
    if mine:
        err(f"{tag}loading weights …")
        t0 = time.perf_counter()
        model = load_model(args, dtype).place(device, dtype)
        err(f"{tag}loaded in {time.perf_counter() - t0:.1f} s")
    for k, i in enumerate(mine):
        name, job = jobs[i]
        job.quiet = job.quiet or not processes.is_main
        err(f"{tag}job {k + 1}/{len(mine)}: {name}")
        try:
            frames[i] = run_job(model, job, device, dtype)
            status[i] = 1
        except (DreamPoseError, OSError, MemoryError) as exc:
            status[i] = 2
            what = exc if isinstance(exc, DreamPoseError) else (getattr(exc, "strerror", None) or exc or
                                                                "out of memory")
            err(f"{tag}job {name} failed: {what}; nothing of it was written under a final name")
        finally:
            job.init_latents_tensor = None

    # 3. the report (main process), from every process's outcome
    got = processes.gather({"status": status[None], "frames": frames[None]})
    status, frames = got["status"].max(0).values, got["frames"].max(0).values
    if not processes.is_main:
        return 0
    words = ("finished earlier", "done", "failed")
    report = {"manifest": os.path.abspath(args.manifest), "processes": processes.world,
              "jobs": [{"name": name, "out": job.out, "status": words[int(status[i])], "frames": int(frames[i])}
                       for i, (name, job) in enumerate(jobs)]}
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, REPORT_NAME), json.dumps(report, indent=1))
    failed = [j["name"] for j in report["jobs"] if j["status"] == "failed"]
    print(f"{int((status == 1).sum())} job(s) done, {len(jobs) - len(todo)} finished earlier, {len(failed)} failed"
          + (f" ({', '.join(failed[:5])}{' …' if len(failed) > 5 else ''}; rerun the same command to retry them)"
             if failed else "") + f"; report in {os.path.join(args.out, REPORT_NAME)}")
    return 1 if failed else 0
