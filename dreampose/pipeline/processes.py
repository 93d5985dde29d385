"""The processes one run is spread over: just this one, or several that ``accelerate launch`` or ``torchrun``
started (they say so in ``WORLD_SIZE``).

Everything a run exchanges between processes goes through the process group (gloo on CPUs, NCCL on GPUs),
so splitting one video needs no shared file system. accelerate is imported only when a launcher started
several processes: a plain run neither needs it nor pays for it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import DreamPoseError


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class Processes:
    """This process's place among the run's processes: ``rank`` of ``world``; rank 0 is the main one, the
    only one that writes outputs and prints."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None   # the device the launcher gave this process (None: one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_launcher(cls, cpu: bool) -> "Processes":
        """The processes a launcher started, joined into one group; one process without a launcher.
        ``cpu``: the run is on CPUs (gloo), not one GPU per process."""
        if launched_processes() <= 1:
            return cls()
        try:
            from accelerate import PartialState
        except ImportError as exc:
            raise DreamPoseError("several processes were launched (WORLD_SIZE > 1), and running them together "
                                 "needs Hugging Face accelerate: pip install accelerate") from exc
        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, state.device)

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every process's ``tensors`` (the same names and shapes on each), concatenated along dim 0 in rank
        order, on the CPU, on every process."""
        if self.world == 1:
            return tensors
        from accelerate.utils import gather

        moved = {k: v.to(self.device) for k, v in tensors.items()}
        return {k: v.cpu() for k, v in gather(moved).items()}

    def wait(self) -> None:
        """Until every process gets here."""
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
