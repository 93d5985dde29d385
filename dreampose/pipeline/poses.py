"""DensePose UV sequences and the 5-frame pose windows the UNet is conditioned on (paper §4.2).

A frame's pose is DensePose UV ``[2,H,W]`` (U then V, ≈0..1 on the body, 0 elsewhere), the layout
of the authors' ``frame_N_densepose.npy`` files. The UNet sees, for frame i, the poses
i−2..i+2 stacked to 10 channels; a neighbour that falls outside the sequence is replaced by the
centre pose (the official ``test.py`` behaviour). As in the official pipeline each pose is resized
bilinearly to the output size, mapped to −1..1 by ``(x−0.5)/0.5``, then sampled to latent size by
nearest interpolation. Both steps commute with stacking, so we keep one normalised UV map per frame
at latent size and gather windows on demand: memory grows with 2 channels a frame, not 10.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DreamPoseError
from ..files.atomic import write_npy_atomic
from ..settings import LATENT_SCALE, POSE_FRAMES, WINDOW_OFFSETS, check_output_size
_NPY_NAME = re.compile(r"^frame_(\d+)_densepose\.npy$")


def window_indices(num_frames: int, offsets: tuple[int, ...] = WINDOW_OFFSETS) -> torch.Tensor:
    """``[F,len(offsets)]`` source frame for each window slot; outside the sequence → the centre frame.

    Args:
        num_frames: ``F``, the length of the pose sequence.
        offsets: each slot's offset from the centre frame, ``(-2, -1, 0, 1, 2)``.

    Returns:
        A ``[F,len(offsets)]`` int64 tensor of frame indices.
    """
    centre = torch.arange(num_frames).unsqueeze(1)
    idx = centre + torch.tensor(offsets).unsqueeze(0)
    return torch.where((idx >= 0) & (idx < num_frames), idx, centre)


def check_uv(uv: torch.Tensor) -> torch.Tensor:
    """Accept ``[2,H,W]`` or ``[F,2,H,W]``; return ``[F,2,H,W]`` float32 or raise a clear error.

    Args:
        uv: DensePose UV (U then V), a tensor or anything ``numpy.asarray`` takes; one frame ``[2,H,W]`` gets a
            frame axis.

    Returns:
        ``[F,2,H,W]`` float32, on the input's device.

    Raises:
        DreamPoseError: another shape (e.g. a 3-channel IUV picture or a coloured DensePose visualisation), no
            frames, or NaN or infinite values.
    """
    if not isinstance(uv, torch.Tensor):
        uv = torch.as_tensor(np.asarray(uv))
    if uv.ndim == 3:
        uv = uv.unsqueeze(0)
    if uv.ndim != 4 or uv.shape[1] != 2:
        raise DreamPoseError(
            f"DensePose UV must be [frames, 2, H, W] (U and V channels), got shape {tuple(uv.shape)}; "
            "a 3-channel IUV picture or a coloured DensePose visualisation is not raw UV")
    if uv.shape[0] == 0:
        raise DreamPoseError("the pose sequence is empty: give at least one DensePose UV frame")
    uv = uv.float()
    if not torch.isfinite(uv).all():
        raise DreamPoseError("the DensePose UV contains NaN or infinite values")
    low, high = float(uv.min()), float(uv.max())
    if low < 0 or high > 1 + 1e-3:
        hint = "; it looks like 0..255 picture values: divide by 255" if low >= 0 and high <= 255 else ""
        raise DreamPoseError(f"DensePose U and V must lie in 0..1 (0 off the body), found {low:g} … {high:g}{hint}")
    return uv


def list_uv_files(folder: str) -> list[str]:
    """The ``frame_N_densepose.npy`` files of a folder, in numeric frame order."""
    if not os.path.isdir(folder):
        raise DreamPoseError(f"pose folder not found: {folder!r} (expected a folder of frame_N_densepose.npy files)")
    found = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _NPY_NAME.match(name)))
    if not found:
        raise DreamPoseError(f"no frame_N_densepose.npy files in {folder!r}")
    return [os.path.join(folder, name) for _, name in found]


def select_range(files: list[str], start: int, count: int, folder: str) -> list[str]:
    """``count`` files from ``start`` (all when ``count`` ≤ 0); an empty pick is the user's error."""
    picked = files[start:]
    if count > 0:
        picked = picked[:count]
    if not picked:
        raise DreamPoseError(f"{folder!r}: no frames left after skipping {start} of {len(files)}")
    return picked


def load_uv_file(path: str) -> torch.Tensor:
    """One authors'-format pose file, ``[2,H,W]``; never unpickles (``allow_pickle=False``)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except EOFError as exc:
        raise DreamPoseError(f"{path}: an empty or cut-off .npy file ({exc}); write that frame's UV again") from exc
    except (ValueError, OSError) as exc:
        raise DreamPoseError(f"{path}: not a plain numeric .npy array ({exc})") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 3 or arr.shape[0] != 2 or 0 in arr.shape:
        raise DreamPoseError(f"{path}: expected a (2, H, W) UV array with H, W > 0, got shape "
                             f"{getattr(arr, 'shape', type(arr).__name__)}")
    return torch.from_numpy(check_uv_values(arr, path).astype(np.float32))


def check_uv_values(arr: np.ndarray, where: str) -> np.ndarray:
    """A pose file's values are what DensePose writes: real numbers, finite, U and V in 0..1 (0 off the
    body). Anything else is refused with what it looks like (a picture's 0..255, complex, text)."""
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == bool:
        raise DreamPoseError(f"{where}: UV must be real numbers, got dtype {arr.dtype}; write the U and V arrays "
                             "as float32")
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DreamPoseError(f"{where}: {bad} of {arr.size} UV values are NaN or infinite; re-run DensePose on "
                             "that frame")
    low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if low < 0 or high > 1 + 1e-3:
        hint = ("; it looks like 0..255 picture values: divide by 255" if low >= 0 and high <= 255 else "")
        raise DreamPoseError(f"{where}: UV values must lie in 0..1, found {low:g} … {high:g}{hint}")
    return arr


def load_uv_folder(folder: str, start: int = 0, count: int = 0) -> torch.Tensor:
    """A folder of ``frame_N_densepose.npy`` → ``[F,2,H,W]``, frames in numeric order (not name order).

    Frames are neighbours by their position in the sorted list, so a folder numbered with a stride still gets
    real neighbours (the official code silently fell back to the centre pose there: docs/official-code.md,
    quirk #11). Files are read without unpickling; other files in the folder are ignored.

    Args:
        folder: the pose folder.
        start: how many of the sorted frames to skip.
        count: how many frames to take from there; 0 or less: all the rest.

    Returns:
        ``[F,2,H,W]`` float32 on the CPU (float64 files are converted).
    """
    files = select_range(list_uv_files(folder), start, count, folder)
    frames = [load_uv_file(p) for p in files]
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) != 1:
        raise DreamPoseError(f"{folder!r}: pose files have different sizes {sorted(shapes)}")
    return torch.stack(frames)


def uv_file_name(number: int) -> str:
    """The authors' name for frame ``number``'s pose file."""
    return f"frame_{number}_densepose.npy"


def prepare_frame_folder(folder: str, pattern: re.Pattern, overwrite: bool) -> None:
    """Create ``folder``; refuse to mix new frames with frames already there unless ``overwrite``,
    which removes only the files named like the ones about to be written."""
    os.makedirs(folder, exist_ok=True)
    existing = sorted(n for n in os.listdir(folder) if pattern.match(n))
    if existing and not overwrite:
        raise DreamPoseError(f"{folder!r} already holds {len(existing)} frame file(s) like {existing[0]!r}; "
                             "choose another folder or turn on overwrite (which replaces them)")
    for name in existing:
        os.remove(os.path.join(folder, name))


def save_uv_folder(folder: str, uv: torch.Tensor, start: int = 0, overwrite: bool = False) -> list[str]:
    """``[F,2,H,W]`` UV → ``frame_N_densepose.npy`` files (N = start, start+1, …), the authors' layout.

    Each file is a float32 ``(2, H, W)`` array (theirs were float64; :func:`load_uv_folder` reads both).

    Args:
        folder: where to write; created if needed.
        uv: DensePose UV ``[F,2,H,W]`` (or one frame ``[2,H,W]``), on any device.
        start: ``N`` of the first file, 0 or more.
        overwrite: remove the ``frame_N_densepose.npy`` files already in ``folder`` (only those) first; without
            it, a folder holding any is refused.

    Returns:
        The paths written, in frame order.
    """
    uv = check_uv(uv).detach().cpu()
    if start < 0:
        raise DreamPoseError(f"the first frame number must be 0 or more, got {start}")
    prepare_frame_folder(folder, _NPY_NAME, overwrite)
    paths = []
    for i, frame in enumerate(uv):
        path = os.path.join(folder, uv_file_name(start + i))
        paths.append(write_npy_atomic(path, frame.numpy().astype(np.float32)))
    return paths


UV_SMOOTH_TOLERANCE = 0.1   # a neighbour frame's U or V further than this from the frame's own is another part


def smooth_uv(uv: torch.Tensor, radius: int, tolerance: float = UV_SMOOTH_TOLERANCE) -> torch.Tensor:
    """A temporal filter of a DensePose UV sequence ``[F,2,H,W]`` over ±``radius`` frames, against the
    frame-to-frame jitter of DensePose estimates. Returns a new tensor; ``radius`` 0 returns ``uv`` itself.

    Per pixel: the body mask is the majority of the window (a tie keeps the frame's own), so a silhouette
    edge that flickers for a frame settles while one moving steadily through the window stays where the
    frame has it. The U and V of a pixel on the body are the mean over the window's frames that show the
    *same part* there, that is whose U and V both lie within ``tolerance`` of the frame's own (a pixel the
    majority puts on the body while the frame does not: of the window's median): a limb passing in front of
    another, a part appearing or leaving, never mixes charts. A static sequence comes back unchanged.
    """
    uv = check_uv(uv)
    if radius < 0:
        raise DreamPoseError(f"the UV smoothing radius is a number of frames ≥ 0, got {radius}")
    if radius == 0 or uv.shape[0] == 1:
        return uv
    count = uv.shape[0]
    on = (uv != 0).any(1)                                             # [F,H,W]
    out = torch.zeros_like(uv)
    for t in range(count):
        lo, hi = max(0, t - radius), min(count, t + radius + 1)
        window, mask = uv[lo:hi], on[lo:hi]                           # [k,2,H,W], [k,H,W]
        votes, size = mask.sum(0), hi - lo
        body = torch.where(2 * votes == size, on[t], 2 * votes > size)
        held = torch.where(mask.unsqueeze(1), window, torch.full_like(window, float("nan")))
        median = held.nanmedian(dim=0).values.nan_to_num(0.0)
        ref = torch.where(on[t].unsqueeze(0), uv[t], median)          # the frame's own part, where it has one
        diff = window - ref
        same = mask & (diff.abs() <= tolerance).all(1)                # [k,H,W]
        weight = same.to(uv.dtype).unsqueeze(1)
        mean = ref + (diff * weight).sum(0) / weight.sum(0).clamp_min(1)
        out[t] = torch.where(body.unsqueeze(0), mean, torch.zeros_like(mean))
    return out


@dataclass
class PoseWindows:
    """A pose sequence ready for sampling: normalised UV at latent size plus the window table."""

    uv: torch.Tensor          # [F,2,h,w], −1..1 on the body, −1 background (after (x−0.5)/0.5)
    indices: torch.Tensor     # [F,5] long, which frame fills each window slot
    height: int               # output size in pixels (the latent is height/8 × width/8)
    width: int

    def __len__(self) -> int:
        return self.indices.shape[0]

    def select(self, frames: slice) -> "PoseWindows":
        """The windows of frames ``frames`` (a step-1 slice) of the sequence, each still filled from its
        real neighbours in the whole sequence: a sub-range renders what those frames of the whole run are."""
        start, stop, step = frames.indices(len(self))
        if step != 1 or start >= stop:
            raise DreamPoseError(f"frame range {frames.start}:{frames.stop} selects no frames of the {len(self)} "
                                 "pose frames (give START:END with START < END, END at most the frame count)")
        return PoseWindows(self.uv, self.indices[start:stop], self.height, self.width)

    def windows(self, frames: slice | torch.Tensor | list[int] = slice(None)) -> torch.Tensor:
        """``[n,10,h,w]`` UNet pose channels for the chosen frames (p(i−2)u,v … p(i+2)u,v)."""
        idx = self.indices[frames]
        gathered = self.uv[idx.reshape(-1)]                       # [n·5,2,h,w]
        return gathered.reshape(idx.shape[0], -1, *self.uv.shape[-2:])

    def to(self, device=None, dtype=None) -> "PoseWindows":
        return PoseWindows(self.uv.to(device=device, dtype=dtype), self.indices, self.height, self.width)


def make_pose_windows(uv: torch.Tensor, height: int = 640, width: int = 512,
                      offsets: tuple[int, ...] = WINDOW_OFFSETS) -> PoseWindows:
    """UV ``[F,2,H,W]`` at any size → :class:`PoseWindows` for an output of ``height×width`` pixels.

    As in the official pipeline, each pose is resized bilinearly to the output size, mapped to −1..1 by
    ``(x−0.5)/0.5``, then sampled to latent size by nearest interpolation.

    Args:
        uv: DensePose UV ``[F,2,H,W]`` (or one frame ``[2,H,W]``), U then V, 0 on the background, any size.
        height, width: the output size in pixels, multiples of 64 (the latent is ``height/8 × width/8``).
        offsets: picks the window, five offsets from the centre frame; ``(0,0,0,0,0)`` gives the paper's 1-pose
            ablation.

    Returns:
        A :class:`PoseWindows`: the normalised UV ``[F,2,height/8,width/8]`` float32 on ``uv``'s device and the
        ``[F,5]`` window table.
    """
    check_output_size(height, width)
    uv = check_uv(uv)
    if len(offsets) != POSE_FRAMES:
        raise DreamPoseError(f"a pose window has {POSE_FRAMES} slots, got offsets {offsets}")
    latent = []
    for chunk in uv.split(16):  # bounded memory for long sequences at full resolution
        full = F.interpolate(chunk, (height, width), mode="bilinear", align_corners=False)
        latent.append(F.interpolate((full - 0.5) / 0.5, (height // LATENT_SCALE, width // LATENT_SCALE),
                                    mode="nearest"))
    return PoseWindows(torch.cat(latent), window_indices(uv.shape[0], offsets), height, width)
