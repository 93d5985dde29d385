"""One video's frames spread over several processes, with the frames one process would make.

Each process renders a contiguous block of whole chunks (``frames_per_batch`` frames each, counted from the
first frame of the run, so every UNet call holds the frames it holds in one process) through
:func:`~dreampose.pipeline.animate.animate` with a frame range: its pose windows see their real neighbours,
and the condition and the shared start latent come from the same seeded draws on every process. The chunks
travel to the main process round by round (one chunk per process per round, so no process holds more than
it would alone), and the main process stretches the clip as one process would.

Only runs whose chunks do not depend on each other split: an ancestral sampler draws fresh noise chunk
after chunk, and cross-frame attention carries an anchor frame from chunk to chunk.
"""
from __future__ import annotations

import torch

from ..errors import DreamPoseError
from ..settings import LATENT_CHANNELS, LATENT_SCALE, SamplingOptions
from .animate import Animation, Chunk, animate
from .consistency import consistency_sources
from .processes import Processes
from .sampling import SampleStats, StepCallback, stretch_frames

ANCESTRAL_SAMPLERS = ("euler_a",)     # draw noise at every step, chunk after chunk, from the run's generator


def frame_blocks(count: int, per_call: int, world: int) -> list[range]:
    """The frames ``0 … count-1`` as ``world`` contiguous blocks of whole chunks of ``per_call`` frames, as even
    as the chunks allow (the first processes take the extra chunk; a process may get none)."""
    chunks = -(-count // per_call)
    base, extra = divmod(chunks, world)
    blocks, first = [], 0
    for rank in range(world):
        n = base + (rank < extra)
        blocks.append(range(min(first * per_call, count), min((first + n) * per_call, count)))
        first += n
    return blocks


def check_split(options: SamplingOptions) -> None:
    """Refuse options whose chunks depend on the chunks before them (they would differ when split)."""
    if options.sampler in ANCESTRAL_SAMPLERS:
        raise DreamPoseError(f"sampler {options.sampler!r} draws new noise chunk after chunk, so frames split over "
                             "several processes would not be the frames of one process; use a deterministic "
                             "sampler (ddim, dpmpp_2m, unipc, pndm) or run it in one process")
    if "anchor" in consistency_sources(options):
        raise DreamPoseError("cross-frame attention carries an anchor frame from chunk to chunk, so it cannot split "
                             "over processes; run it in one process or set cross_frame_attention to 0")


@torch.no_grad()
def animate_split(model, image: torch.Tensor, uv: torch.Tensor, options: SamplingOptions, processes: Processes, *,
                  latents: torch.Tensor | None = None, callback: StepCallback | None = None, on_chunk=None,
                  frames: slice | None = None) -> Animation | None:
    """:func:`~dreampose.pipeline.animate.animate_clip` over ``processes``: every process calls it with the same
    arguments; the main process returns the whole clip (frames, latents, the processes' summed counts), the
    others None. The seed is ``options.seed`` (a generator cannot travel between processes).

    Args as ``animate_clip``; ``latents``: x_T ``[1|F,4,h,w]`` for the ``frames`` range; ``callback`` sees this
    process's steps; ``on_chunk(chunk, total)`` (main process) as each chunk arrives, in frame order per round.
    """
    check_split(options)
    start, stop, _ = (frames if frames is not None else slice(None)).indices(uv.shape[0] if uv.ndim == 4 else 1)
    total, per_call = max(0, stop - start), options.frames_per_batch
    if total == 0:
        raise DreamPoseError("the frame range selects no frame")
    blocks = frame_blocks(total, per_call, processes.world)
    mine = blocks[processes.rank]
    stats = SampleStats()
    chunks = iter(())
    if len(mine):
        own = latents if latents is None or latents.shape[0] == 1 else latents[mine.start:mine.stop]
        chunks = animate(model, image, uv, options, latents=own, callback=callback, stats=stats,
                         frames=slice(start + mine.start, start + mine.stop))
    h, w = options.height // LATENT_SCALE, options.width // LATENT_SCALE
    images = torch.zeros(per_call, options.height, options.width, 3)
    lats = torch.zeros(per_call, LATENT_CHANNELS, h, w)
    out_images = torch.empty(total, options.height, options.width, 3) if processes.is_main else None
    out_latents = torch.empty(total, LATENT_CHANNELS, h, w) if processes.is_main else None
    for round_ in range(max(-(-len(b) // per_call) for b in blocks)):
        chunk = next(chunks, None)
        n = 0 if chunk is None else chunk.frames.stop - chunk.frames.start
        if n:
            images[:n], lats[:n] = chunk.images, chunk.latents
        got = processes.gather({"images": images, "latents": lats, "count": torch.tensor([n])})
        if not processes.is_main:
            continue
        for rank, block in enumerate(blocks):
            n = int(got["count"][rank])
            if not n:
                continue
            at = block.start + round_ * per_call
            out_images[at:at + n] = got["images"][rank * per_call:rank * per_call + n]
            out_latents[at:at + n] = got["latents"][rank * per_call:rank * per_call + n]
            if on_chunk is not None:
                on_chunk(Chunk(slice(at, at + n), out_latents[at:at + n], out_images[at:at + n]), total)
    counts = processes.gather({"n": torch.tensor([[stats.unet_calls, stats.image_evaluations, stats.frames,
                                                   stats.unet_batch, stats.encode_s, stats.sample_s,
                                                   stats.decode_s]], dtype=torch.float64)})["n"]
    if not processes.is_main:
        return None
    whole = SampleStats(unet_calls=int(counts[:, 0].sum()), image_evaluations=int(counts[:, 1].sum()),
                        frames=int(counts[:, 2].sum()), unet_batch=int(counts[:, 3].max()),
                        encode_s=float(counts[:, 4].max()), sample_s=float(counts[:, 5].max()),
                        decode_s=float(counts[:, 6].max()))
    whole.init_latents = (latents if latents is not None and latents.shape[0] > 1
                          else stats.init_latents[:1].expand(total, -1, -1, -1))
    return Animation(stretch_frames(out_images, options.stretch), out_latents, whole)
