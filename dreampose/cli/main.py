"""``python -m dreampose``: animate, batch, demo, convert, finetune, bench, synth, prepare, train and eval
without ComfyUI.

Each command is one module of this folder with a ``register(subparsers)`` that adds its parser and
sets its ``func``; :func:`main` only dispatches. Every user input is checked before any weights are
read; a bad input (or a destination that cannot take the output) prints one line and exits with status
2, an interrupt exits 130, an unforeseen I/O error or running out of memory prints one line and exits 1.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import DreamPoseError
from . import animate, batch, bench, convert, demo, finetune, prepare, synth, train
from . import eval as evaluate
from .common import err

MAX_THREADS = 1024            # far past any machine's cores; 100000 made OpenMP crash the process
OUT_OF_MEMORY = "out of memory; try a smaller size, fewer --frames-per-batch, or --dtype fp16/bf16 on a GPU"
ALLOCATION_FAILED = ("can't allocate memory", "CUDA out of memory", "out of memory", "not enough memory")
COMMANDS = (animate, batch, demo, convert, finetune, bench, synth, prepare, train, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreampose",
                                     description="DreamPose (Karras et al., ICCV 2023) without ComfyUI.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _calm_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    On a machine whose cores are shared with other jobs, spinning threads starve each other: the
    tiny demo measured 11–41 s instead of 6.5 s on a busy 2-core box (docs/benchmarks.md). It only
    takes effect if PyTorch is not imported yet, i.e. when this is the program, not a library call.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    _calm_openmp()
    args = build_parser().parse_args(argv)
    threads = None
    try:
        if getattr(args, "threads", None):
            if args.threads > MAX_THREADS:
                raise DreamPoseError(f"--threads {args.threads}: at most {MAX_THREADS} (more threads than cores "
                                     "only slow PyTorch down; this machine has "
                                     f"{os.cpu_count() or 'an unknown number of'} cores)")
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(args.threads)
        return args.func(args)
    except DreamPoseError as exc:
        err(f"dreampose {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        err(f"dreampose {args.command}: interrupted")
        return 130
    except OSError as exc:        # a read or write the checks could not foresee: the cause, no traceback
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        err(f"dreampose {args.command}: error:{where} {exc.strerror or exc}; nothing was written under a final "
            "name that is not complete")
        return 1
    except MemoryError:
        err(f"dreampose {args.command}: error: {OUT_OF_MEMORY}")
        return 1
    except RuntimeError as exc:   # PyTorch's allocators say it this way (CPU and CUDA)
        if not any(words in str(exc) for words in ALLOCATION_FAILED):
            raise
        err(f"dreampose {args.command}: error: {OUT_OF_MEMORY} ({str(exc).splitlines()[0][:200]})")
        return 1
    finally:
        if threads is not None:   # main() may run inside another program (tests): leave it as found
            import torch

            torch.set_num_threads(threads)
