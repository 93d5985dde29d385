"""Evaluation metrics for generated videos against their ground truth (paper §5, Tables 1 and 2).

Frames are ``[F,3,H,W]`` float in 0..1, generated (``pred``) and real (``gt``) of the same size.
Pixel metrics (L1, SSIM), mask metrics (IoU, pose alignment) and the flicker ratio are plain
tensor functions, computed in float64 so tests can check them against hand arithmetic. Feature
metrics (VGG, LPIPS, FID, FVD) need pretrained networks; they run only when their weights are on
this machine (given as files, or found under ``$TORCH_HOME/hub/checkpoints``): nothing is ever
downloaded, and a metric without weights is reported as skipped with the reason.

Definitions (precise, because published numbers depend on them):

* ``l1``: mean |pred − gt| over channels and pixels, per frame.
* ``ssim``: Wang et al. 2004 with an 11×11 Gaussian window (σ 1.5), K1 0.01, K2 0.03, data range 1,
  'valid' windows only (no padding, as the authors' MATLAB code), per channel, then the mean over
  the SSIM map and the channels.
* ``vgg``: the perceptual (feature reconstruction) distance of Johnson et al. 2016 that the paper's
  "VGG" column cites: inputs normalised with the ImageNet mean/std, torchvision VGG16 features at
  relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (VGG19: relu1_2, relu2_2, relu3_4, relu4_4, relu5_4);
  per layer the mean absolute difference over C·H·W, then the mean over the five layers. The paper
  does not say which layers or norm it used, so values are not comparable with its table.
* ``lpips``: LPIPS v0.1 with the VGG16 backbone (Zhang et al. 2018): inputs 2x−1, shifted and scaled
  by the LPIPS constants, the same five VGG16 taps, each unit-normalised over channels, squared
  difference weighted per channel by the learnt linear layers, spatial mean, summed over layers.
* ``fid``: Fréchet distance between Gaussians fitted to 2048-d pool features of torchvision's
  Inception v3 (ImageNet weights; inputs resized to 299×299). That is NOT the TF-FID network the
  published FIDs use: values are only comparable between runs of this code.
* ``drift``: appearance drift on exact correspondences (synthetic world only, where every pixel's
  body-surface point is known): the surface is cut into cells of (part, U, V) (16 bins per chart axis),
  each frame's mean colour per cell is taken, and two frames' mean |colour difference| over the cells
  both show is their drift; the same on the true frames is the floor (:func:`appearance_drift`).
* ``fvd``: Fréchet distance of I3D features of 16-frame clips, with a user-supplied TorchScript I3D
  (e.g. StyleGAN-V's ``i3d_torchscript.pt``) called as
  ``net(x, rescale=False, resize=False, return_features=True)`` on ``x`` ``[N,3,16,224,224]`` in
  −1..1 (shorter side resized to 224, centre crop) and returning ``[N,D]`` features.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DreamPoseError

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# indices of the ReLU outputs tapped in torchvision's ``vgg.features``
VGG_TAPS = {"vgg16": (3, 8, 15, 22, 29), "vgg19": (3, 8, 17, 26, 35)}
VGG_CFG = {"vgg16": "D", "vgg19": "E"}
FVD_CLIP = 16
I3D_SIZE = 224
INCEPTION_SIZE = 299
# the file names torchvision's own downloads use in $TORCH_HOME/hub/checkpoints
STANDARD_FILES = {
    "vgg": ("vgg16-397923af.pth", "vgg19-dcbb9e9d.pth"),
    "inception": ("inception_v3_google-0cc3c7bd.pth", "inception_v3_google-1a9a5a14.pth"),
}


# --------------------------------------------------------------------------------------------- checks

def _frames(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DreamPoseError(f"{name}: expected frames [F,3,H,W] in 0..1, got {shape}")
    return x.detach().to("cpu", torch.float64)


def _pair(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred, gt = _frames(pred, "generated frames"), _frames(gt, "ground truth frames")
    if pred.shape != gt.shape:
        raise DreamPoseError(f"generated frames {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ "
                             "in shape; resize the generated frames to the ground truth first")
    return pred, gt


# --------------------------------------------------------------------------------------------- pixels

def l1(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-frame mean absolute error ``[F]`` (float64)."""
    pred, gt = _pair(pred, gt)
    return (pred - gt).abs().mean(dim=(1, 2, 3))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian ``[size]`` (float64), centred on the middle sample."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: torch.Tensor, gt: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-frame SSIM ``[F]`` (float64), Wang et al.'s definition (see the module docstring)."""
    pred, gt = _pair(pred, gt)
    f, c, h, w = pred.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise DreamPoseError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {w}x{h}")
    g = gaussian_window()
    kh, kw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(x):   # separable Gaussian, 'valid' windows only
        return F.conv2d(F.conv2d(x, kh), kw)

    x, y = pred.reshape(f * c, 1, h, w), gt.reshape(f * c, 1, h, w)
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.reshape(f, c, -1).mean(dim=2).mean(dim=1)


# --------------------------------------------------------------------------------------------- masks

def _masks(m: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor) or m.ndim != 3:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise DreamPoseError(f"{name}: expected masks [F,H,W], got {shape}")
    return m.detach().cpu().bool()


def mask_iou(pred_mask: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
    """Per-frame intersection over union ``[F]`` (float64); two empty masks agree perfectly (1)."""
    a, b = _masks(pred_mask, "masks"), _masks(ref_mask, "reference masks")
    if a.shape != b.shape:
        raise DreamPoseError(f"masks {tuple(a.shape)} and {tuple(b.shape)} differ in shape")
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation of ``range(n)`` in which no index maps to itself (``n`` ≥ 2).

    Built as one random cycle (visit the indices in a random order, each pointing at the next), so
    it exists for every n ≥ 2 without rejection sampling.
    """
    if n < 2:
        raise DreamPoseError(f"a derangement needs at least 2 frames, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    perm = [0] * n
    for i in range(n):
        perm[order[i]] = order[(i + 1) % n]
    return perm


def pose_alignment(gen_masks: torch.Tensor, pose_masks: torch.Tensor, shuffle_seed: int = 0) -> dict:
    """How well the generated body follows the driving pose, and a control that says how much of that
    is just "a body in the middle of the frame".

    ``iou``: mean IoU of the generated silhouette of frame i with the pose mask of frame i.
    ``shuffled_iou``: the same with the pose masks in a deranged order (:func:`derangement` with
    ``shuffle_seed``: no frame keeps its own pose), ``None`` for a single frame. A model that
    follows the poses scores ``iou`` clearly above ``shuffled_iou``; one that ignores them scores both
    alike. ``permutation``: the pose frame compared with each generated frame in the control.
    """
    gen, pose = _masks(gen_masks, "generated masks"), _masks(pose_masks, "pose masks")
    if gen.shape != pose.shape:
        raise DreamPoseError(f"generated masks {tuple(gen.shape)} and pose masks {tuple(pose.shape)} differ")
    iou = mask_iou(gen, pose)
    out = {"iou": float(iou.mean()), "per_frame": iou.tolist(), "shuffled_iou": None, "permutation": None}
    if gen.shape[0] >= 2:
        perm = derangement(gen.shape[0], shuffle_seed)
        out["shuffled_iou"] = float(mask_iou(gen, pose[perm]).mean())
        out["permutation"] = perm
    return out


# --------------------------------------------------------------------------------------------- time

def frame_changes(frames: torch.Tensor) -> torch.Tensor:
    """Mean |f(t+1) − f(t)| over channels and pixels for each consecutive pair ``[F−1]`` (float64)."""
    x = _frames(frames, "frames")
    return (x[1:] - x[:-1]).abs().mean(dim=(1, 2, 3))


def flicker(pred: torch.Tensor, gt: torch.Tensor, pairs: torch.Tensor | list[int] | None = None) -> dict:
    """Frame-to-frame change of the generated video against the real one.

    ``generated``/``ground_truth``: mean |f(t+1) − f(t)| over the consecutive pairs (``pairs``: the
    indices t to use, default all). ``ratio`` = generated / ground truth: above 1 the generation
    changes (flickers) more than reality, below 1 it is stiller than reality; ``None`` when the real
    video does not change at all or there is no pair.
    """
    pred, gt = _pair(pred, gt)
    dp, dg = frame_changes(pred), frame_changes(gt)
    if pairs is not None:
        idx = torch.as_tensor(pairs, dtype=torch.long)
        dp, dg = dp[idx], dg[idx]
    if dp.numel() == 0:
        return {"generated": None, "ground_truth": None, "ratio": None, "pairs": 0}
    gen, real = float(dp.mean()), float(dg.mean())
    return {"generated": gen, "ground_truth": real, "ratio": gen / real if real > 0 else None,
            "pairs": int(dp.numel())}


DRIFT_BINS = 16   # cells per chart axis: a body-surface cell is (part, U bin, V bin)


def surface_cells(parts: torch.Tensor, uv: torch.Tensor, bins: int = DRIFT_BINS) -> torch.Tensor:
    """The body-surface cell of every pixel, ``[F,H,W]`` int64 from the exact part index ``[F,H,W]``
    (0 = background) and UV ``[F,2,H,W]``: ``(part − 1)·bins² + U bin·bins + V bin``, −1 off the body."""
    if parts.shape != uv[..., 0, :, :].shape or uv.shape[-3] != 2:
        raise DreamPoseError(f"parts {tuple(parts.shape)} and UV {tuple(uv.shape)} do not describe the same frames")
    ub = (uv[..., 0, :, :] * bins).long().clamp(0, bins - 1)
    vb = (uv[..., 1, :, :] * bins).long().clamp(0, bins - 1)
    cells = (parts.long() - 1) * bins * bins + ub * bins + vb
    return torch.where(parts > 0, cells, torch.full_like(cells, -1))


def cell_colours(frames: torch.Tensor, cells: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean colour of each surface cell per frame: ``([F,count,3]`` float64, ``[F,count]`` pixel counts)."""
    x = _frames(frames, "frames").permute(0, 2, 3, 1).reshape(frames.shape[0], -1, 3)
    c = cells.reshape(cells.shape[0], -1)
    on = c >= 0
    sums = x.new_zeros(x.shape[0], count, 3)
    counts = x.new_zeros(x.shape[0], count)
    for f in range(x.shape[0]):
        sums[f].index_add_(0, c[f][on[f]], x[f][on[f]])
        counts[f].index_add_(0, c[f][on[f]], torch.ones_like(c[f][on[f]], dtype=x.dtype))
    return sums / counts.clamp_min(1).unsqueeze(-1), counts


def colour_drift(colours_a: torch.Tensor, counts_a: torch.Tensor, colours_b: torch.Tensor,
                 counts_b: torch.Tensor) -> float | None:
    """Mean over the surface cells seen in both frames of the mean |colour difference| over channels;
    None when the frames share no cell."""
    shared = (counts_a > 0) & (counts_b > 0)
    if not bool(shared.any()):
        return None
    return float((colours_a - colours_b).abs().mean(-1)[shared].mean())


def appearance_drift(pred: torch.Tensor, gt: torch.Tensor, parts: torch.Tensor, uv: torch.Tensor, *,
                     key_frame: torch.Tensor | None = None, key_parts: torch.Tensor | None = None,
                     key_uv: torch.Tensor | None = None, pairs: list[int] | None = None,
                     key_pairs: list[int] | None = None, masks: torch.Tensor | None = None,
                     bins: int = DRIFT_BINS) -> dict:
    """How much the colour of the same body-surface point changes between frames, on exact correspondences.

    A pixel's surface point is its ground-truth (part, U, V), binned into cells (:func:`surface_cells`).
    For two frames, the colour of every cell both show is compared (the cell's mean colour in each), and the
    differences are averaged. ``consecutive``: frames t and t+1 (``pairs``: the t to use, default all);
    ``key``: the subject photo (``key_frame`` ``[3,H,W]`` 0..1 with its parts and UV) against every frame
    (``key_pairs``: the frames to use).
    Each gives ``generated`` (the colours of ``pred``) and ``ground_truth`` (of ``gt``: the floor the
    binning leaves, since a cell is not a point) and ``excess`` = generated − ground truth; None where no
    pair shares a cell.
    ``masks`` ``[F,H,W]`` bool (e.g. the generated person's silhouette): only these pixels of the frames count,
    in ``pred`` and ``gt`` alike. Restricted to where the generated person stands, the drift measures texture
    (the same surface point painted another colour) apart from pose error (background painted where the true
    body is).
    """
    pred, gt = _pair(pred, gt)
    count = int(parts.max().clamp_min(1)) * bins * bins
    if key_parts is not None:
        count = max(count, int(key_parts.max().clamp_min(1)) * bins * bins)
    cells = surface_cells(parts, uv, bins)
    if masks is not None:
        if masks.shape != cells.shape:
            raise DreamPoseError(f"drift masks {tuple(masks.shape)} do not match the frames {tuple(cells.shape)}")
        cells = torch.where(masks.bool(), cells, torch.full_like(cells, -1))
    gen, gen_n = cell_colours(pred, cells, count)
    real, real_n = cell_colours(gt, cells, count)
    steps = range(pred.shape[0] - 1) if pairs is None else pairs

    def summary(values_gen, values_real) -> dict:
        both = [(a, b) for a, b in zip(values_gen, values_real) if a is not None and b is not None]
        if not both:
            return {"generated": None, "ground_truth": None, "excess": None, "pairs": 0}
        g = sum(a for a, _ in both) / len(both)
        r = sum(b for _, b in both) / len(both)
        return {"generated": g, "ground_truth": r, "excess": g - r, "pairs": len(both)}

    out = {"consecutive": summary([colour_drift(gen[t], gen_n[t], gen[t + 1], gen_n[t + 1]) for t in steps],
                                  [colour_drift(real[t], real_n[t], real[t + 1], real_n[t + 1]) for t in steps])}
    if key_frame is not None:
        if key_parts is None or key_uv is None:
            raise DreamPoseError("the key frame's drift needs its parts and UV too")
        key, key_n = cell_colours(key_frame.unsqueeze(0), surface_cells(key_parts.unsqueeze(0),
                                                                         key_uv.unsqueeze(0), bins), count)
        later = range(pred.shape[0]) if key_pairs is None else key_pairs
        out["key"] = summary([colour_drift(key[0], key_n[0], gen[t], gen_n[t]) for t in later],
                             [colour_drift(key[0], key_n[0], real[t], real_n[t]) for t in later])
    return out


# --------------------------------------------------------------------------------------------- Fréchet

def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, method: str) -> float:
    """Tr sqrt(Σ1 Σ2) for PSD Σ1, Σ2."""
    if method == "auto":
        try:
            import scipy.linalg

            del scipy
            method = "sqrtm"
        except ImportError:
            method = "eigh"
    if method == "sqrtm":
        import scipy.linalg

        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():   # singular product: nudge both, as is usual for FID
            eps = np.eye(s1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
        return float(np.real(np.trace(covmean)))
    if method == "eigh":
        # Σ1Σ2 is similar to the PSD matrix Σ1^½ Σ2 Σ1^½, whose eigenvalues are real and ≥ 0
        w, v = np.linalg.eigh(s1)
        half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = half @ s2 @ half
        ev = np.linalg.eigvalsh((m + m.T) / 2)
        return float(np.sqrt(np.clip(ev, 0, None)).sum())
    raise DreamPoseError(f"unknown matrix square root method {method!r}; use auto, sqrtm or eigh")


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "auto") -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 − mu2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½). ``method``: ``sqrtm`` (scipy), ``eigh`` (numpy
    eigen-decomposition) or ``auto`` (scipy when it imports)."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise DreamPoseError(f"Fréchet distance: means {mu1.shape}/{mu2.shape} and covariances "
                             f"{s1.shape}/{s2.shape} do not fit together")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2, method)
    return float(max(value, 0.0))


def frechet_distance_from_features(a, b, method: str = "auto") -> float:
    """Fréchet distance of Gaussians fitted to feature rows ``a`` ``[N1,D]`` and ``b`` ``[N2,D]``
    (sample covariance, N−1).

    With fewer samples than dimensions (a short evaluation against 2048-d Inception features) the
    covariances are low rank; then Tr (Σ1 Σ2)^½ equals the nuclear norm of A1 A2ᵀ / √((N1−1)(N2−1))
    with A the centred features — exact, and an (N1×N2) problem instead of a (D×D) one.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DreamPoseError(f"feature sets must be [N,D] with the same D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise DreamPoseError(f"a Fréchet distance needs at least 2 samples per set, got {a.shape[0]} and "
                             f"{b.shape[0]}")
    if a.shape[0] + b.shape[0] >= a.shape[1]:
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), method)
    ca, cb = a - a.mean(0), b - b.mean(0)
    n1, n2 = a.shape[0] - 1, b.shape[0] - 1
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt(n1 * n2)
    diff = a.mean(0) - b.mean(0)
    value = diff @ diff + (ca * ca).sum() / n1 + (cb * cb).sum() / n2 - 2 * trace_sqrt
    return float(max(value, 0.0))


# --------------------------------------------------------------------------------------------- weights

def skipped(metric: str, reason: str) -> str:
    return f"{metric}: skipped — {reason}"


def is_skipped(value) -> bool:
    return isinstance(value, str)


def hub_checkpoints() -> str:
    """``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``), where torchvision
    keeps the weights it downloaded: read, never written."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return os.path.join(home, "hub", "checkpoints")


def discover_weights() -> dict[str, str]:
    """Weights already on this machine under their standard names: ``vgg``, ``vgg16``, ``inception``
    (torchvision's file names in :func:`hub_checkpoints`) and ``lpips`` (the v0.1 ``vgg.pth`` that the
    ``lpips`` package ships, found without importing the package)."""
    found = {}
    folder = hub_checkpoints()
    for kind, names in STANDARD_FILES.items():
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                found.setdefault(kind, path)
                if name.startswith("vgg16"):
                    found["vgg16"] = path
    try:
        import importlib.util

        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(next(iter(spec.submodule_search_locations)), "weights", "v0.1", "vgg.pth")
        if os.path.isfile(path):
            found["lpips"] = path
    return found


def read_weights(path: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a plain torch file (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise DreamPoseError(f"{what}: not found: {path}")
    try:
        if path.lower().endswith((".safetensors", ".sft")):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # any unreadable file is the user's to replace: say which and why
        raise DreamPoseError(f"{what} {path}: not a readable weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DreamPoseError(f"{what} {path}: expected a state dict of tensors")
    return state


def _torchvision():
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision


# --------------------------------------------------------------------------------------------- VGG / LPIPS

class VGGFeatures(torch.nn.Module):
    """torchvision's VGG16/19 ``features`` with the ReLU outputs of :data:`VGG_TAPS` returned."""

    def __init__(self, arch: str, features: torch.nn.Module):
        super().__init__()
        self.arch, self.features, self.taps = arch, features, VGG_TAPS[arch]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
                if len(out) == len(self.taps):
                    break
        return out


def load_vgg(path: str, device="cpu") -> VGGFeatures:
    """A torchvision VGG16 or VGG19 state dict (the architecture is read from the keys)."""
    tv = _torchvision()
    if tv is None:
        raise DreamPoseError("VGG features need torchvision, which is not installed")
    state = read_weights(path, "VGG weights")
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    convs = sorted({int(m.group(1)) for k in feats if (m := re.match(r"^(\d+)\.weight$", k))})
    arch = {13: "vgg16", 16: "vgg19"}.get(len(convs))
    if arch is None:
        raise DreamPoseError(f"VGG weights {path}: not a torchvision VGG16/VGG19 state dict (expected 13 or 16 "
                             f"'features.N.weight' convolutions, found {len(convs)})")
    from torchvision.models import vgg as tv_vgg

    features = tv_vgg.make_layers(tv_vgg.cfgs[VGG_CFG[arch]], batch_norm=False)
    try:
        features.load_state_dict(feats)
    except RuntimeError as exc:
        raise DreamPoseError(f"VGG weights {path}: do not fit torchvision's {arch} ({exc})") from exc
    return VGGFeatures(arch, features).eval().requires_grad_(False).to(device)


def _imagenet(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def vgg_distance(pred: torch.Tensor, gt: torch.Tensor, net: VGGFeatures, batch: int = 8) -> torch.Tensor:
    """Per-frame VGG perceptual distance ``[F]`` (definition in the module docstring)."""
    pred, gt = _pair(pred, gt)
    dev, out = _device_of(net), []
    for i in range(0, pred.shape[0], batch):
        fa = net(_imagenet(pred[i:i + batch].to(dev, torch.float32)))
        fb = net(_imagenet(gt[i:i + batch].to(dev, torch.float32)))
        per_layer = [(a - b).abs().flatten(1).mean(1) for a, b in zip(fa, fb)]
        out.append(torch.stack(per_layer).mean(0).double().cpu())
    return torch.cat(out)


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 (VGG16): the backbone taps plus one non-negative weight per channel and layer."""

    def __init__(self, vgg: VGGFeatures, weights: list[torch.Tensor]):
        super().__init__()
        if vgg.arch != "vgg16":
            raise DreamPoseError(f"LPIPS v0.1 'vgg' is defined on VGG16, got {vgg.arch} weights")
        self.vgg = vgg
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(w.detach().float().view(1, -1, 1, 1),
                                                                  requires_grad=False) for w in weights])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """0..1 frames ``[N,3,H,W]`` → ``[N]``."""
        f0 = self.vgg((x0 * 2 - 1 - self.shift) / self.scale)
        f1 = self.vgg((x1 * 2 - 1 - self.shift) / self.scale)
        total = 0
        for a, b, w in zip(f0, f1, self.weights):
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((na - nb).pow(2) * w).sum(1).mean(dim=(1, 2))
        return total


def load_lpips(path: str, vgg: VGGFeatures) -> LPIPS:
    """The ``lpips`` package's v0.1 linear-layer file (``lin0..lin4.model.1.weight``, ``[1,C,1,1]``)."""
    state = read_weights(path, "LPIPS weights")
    weights = []
    for k, channels in enumerate(LPIPS_CHANNELS):
        hits = [v for name, v in state.items() if re.search(rf"(^|\.)lin{k}\.model\.1\.weight$", name)]
        if len(hits) != 1 or hits[0].numel() != channels:
            raise DreamPoseError(f"LPIPS weights {path}: not an LPIPS v0.1 'vgg' linear-layer file (expected "
                                 f"lin{k}.model.1.weight of {channels} channels; keys like {sorted(state)[:3]})")
        weights.append(hits[0])
    return LPIPS(vgg, weights).eval().to(_device_of(vgg))


@torch.no_grad()
def lpips_distance(pred: torch.Tensor, gt: torch.Tensor, net: LPIPS, batch: int = 8) -> torch.Tensor:
    """Per-frame LPIPS ``[F]``."""
    pred, gt = _pair(pred, gt)
    dev, out = _device_of(net), []
    for i in range(0, pred.shape[0], batch):
        out.append(net(pred[i:i + batch].to(dev, torch.float32), gt[i:i + batch].to(dev, torch.float32))
                   .double().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------- FID / FVD

def load_inception(path: str, device="cpu") -> torch.nn.Module:
    """torchvision Inception v3 (e.g. ``inception_v3_google-0cc3c7bd.pth``) returning 2048-d pool features.

    ``transform_input=True`` as torchvision sets for these ImageNet weights: inputs are given
    ImageNet-normalised and converted to the normalisation the ported Google weights expect.
    """
    tv = _torchvision()
    if tv is None:
        raise DreamPoseError("FID needs torchvision, which is not installed")
    state = read_weights(path, "Inception weights")
    if "Mixed_7c.branch_pool.conv.weight" not in state or "fc.weight" not in state:
        raise DreamPoseError(f"Inception weights {path}: not a torchvision inception_v3 state dict "
                             "(no Mixed_7c / fc weights)")
    aux = any(k.startswith("AuxLogits.") for k in state)
    net = tv.models.inception_v3(weights=None, aux_logits=aux, init_weights=False, transform_input=True,
                                 num_classes=state["fc.weight"].shape[0])
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise DreamPoseError(f"Inception weights {path}: do not fit torchvision's inception_v3 ({exc})") from exc
    net.fc = torch.nn.Identity()
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def inception_features(frames: torch.Tensor, net: torch.nn.Module, batch: int = 16) -> torch.Tensor:
    """0..1 frames ``[F,3,H,W]`` → ``[F,2048]`` (float64, CPU)."""
    x = _frames(frames, "frames")
    dev, out = _device_of(net), []
    for i in range(0, x.shape[0], batch):
        chunk = F.interpolate(x[i:i + batch].to(dev, torch.float32), (INCEPTION_SIZE, INCEPTION_SIZE),
                              mode="bilinear", align_corners=False, antialias=True)
        out.append(net(_imagenet(chunk)).double().cpu())
    return torch.cat(out)


def load_i3d(path: str, device="cpu") -> torch.jit.ScriptModule:
    """A user-given I3D TorchScript file (it runs code from the file: only ever a path the user named)."""
    if not os.path.isfile(path):
        raise DreamPoseError(f"I3D weights: not found: {path}")
    try:
        with warnings.catch_warnings():   # TorchScript is deprecated, but it is the format I3D ships in
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location=device).eval()
    except Exception as exc:   # a non-TorchScript file raises various error types
        raise DreamPoseError(f"I3D weights {path}: not a TorchScript file ({type(exc).__name__}: {exc}); FVD "
                             "needs a TorchScript I3D such as StyleGAN-V's i3d_torchscript.pt") from exc


def i3d_clips(frames: torch.Tensor, length: int = FVD_CLIP) -> torch.Tensor:
    """Non-overlapping clips ``[N,3,length,224,224]`` in −1..1 (shorter side → 224, centre crop)."""
    x = _frames(frames, "frames").float()
    n = x.shape[0] // length
    if n == 0:
        return x.new_zeros((0, 3, length, I3D_SIZE, I3D_SIZE))
    x = x[:n * length]
    h, w = x.shape[-2:]
    scale = I3D_SIZE / min(h, w)
    size = (max(I3D_SIZE, round(h * scale)), max(I3D_SIZE, round(w * scale)))
    x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - I3D_SIZE) // 2, (size[1] - I3D_SIZE) // 2
    x = x[:, :, top:top + I3D_SIZE, left:left + I3D_SIZE] * 2 - 1
    return x.reshape(n, length, 3, I3D_SIZE, I3D_SIZE).permute(0, 2, 1, 3, 4).contiguous()


@torch.no_grad()
def i3d_features(clips: torch.Tensor, net, batch: int = 4) -> torch.Tensor:
    """Clips from :func:`i3d_clips` → ``[N,D]`` (float64, CPU)."""
    params = list(net.parameters())
    dev = params[0].device if params else torch.device("cpu")
    out = []
    for i in range(0, clips.shape[0], batch):
        try:
            feats = net(clips[i:i + batch].to(dev), rescale=False, resize=False, return_features=True)
        except Exception as exc:   # TorchScript call errors come in many types
            raise DreamPoseError("the I3D TorchScript file does not accept net(x, rescale=False, resize=False, "
                                 f"return_features=True) on x [N,3,{FVD_CLIP},224,224] ({exc})") from exc
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2:
            raise DreamPoseError("the I3D TorchScript file must return [N,D] features, got "
                                 f"{getattr(feats, 'shape', type(feats).__name__)}")
        out.append(feats.double().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0), dtype=torch.float64)


# --------------------------------------------------------------------------------------------- bundle

@dataclass
class FeatureNets:
    """The feature networks an evaluation can use; a missing one has its skip reason instead."""

    vgg: VGGFeatures | None = None
    lpips: LPIPS | None = None
    inception: torch.nn.Module | None = None
    i3d: object | None = None
    skipped: dict = field(default_factory=dict)   # metric → "metric: skipped — reason"
    files: dict = field(default_factory=dict)     # metric → the weights file used

    def status(self) -> dict:
        """metric → the file it uses, or its skip message."""
        return {m: self.files.get(m) or self.skipped.get(m) for m in ("vgg", "lpips", "fid", "fvd")}


def load_feature_nets(vgg: str | None = None, lpips: str | None = None, inception: str | None = None,
                      i3d: str | None = None, *, device="cpu", discover: bool = True) -> FeatureNets:
    """Load the feature networks from the given files, else from :func:`discover_weights` (when
    ``discover``). A given file that is missing or wrong is an error; an absent one skips its metric."""
    for flag, path in (("--vgg-weights", vgg), ("--lpips-weights", lpips), ("--inception-weights", inception),
                       ("--i3d-weights", i3d)):
        if path and not os.path.isfile(path):
            raise DreamPoseError(f"{flag}: not found: {path}")
    found = discover_weights() if discover else {}
    nets = FeatureNets()
    tv = _torchvision()
    if tv is None:
        for metric in ("vgg", "lpips", "fid"):
            nets.skipped[metric] = skipped(metric, "torchvision not installed (pip install torchvision)")
    else:
        vgg_path = vgg or found.get("vgg")
        if vgg_path:
            nets.vgg, nets.files["vgg"] = load_vgg(vgg_path, device), vgg_path
        else:
            nets.skipped["vgg"] = skipped("vgg", "no VGG16/19 weights found (give --vgg-weights FILE, e.g. "
                                                 "torchvision's vgg16-397923af.pth)")
        lin_path = lpips or found.get("lpips")
        if not lin_path:
            nets.skipped["lpips"] = skipped("lpips", "no LPIPS weights found (give --lpips-weights FILE)")
        else:
            backbone = nets.vgg if nets.vgg is not None and nets.vgg.arch == "vgg16" else None
            if backbone is None and found.get("vgg16"):
                backbone = load_vgg(found["vgg16"], device)
            if backbone is None:
                nets.skipped["lpips"] = skipped("lpips", "LPIPS needs VGG16 backbone weights (give --vgg-weights "
                                                         "with torchvision's vgg16-397923af.pth)")
            else:
                nets.lpips, nets.files["lpips"] = load_lpips(lin_path, backbone), lin_path
        inc_path = inception or found.get("inception")
        if inc_path:
            nets.inception, nets.files["fid"] = load_inception(inc_path, device), inc_path
        else:
            nets.skipped["fid"] = skipped("fid", "no Inception v3 weights found (give --inception-weights FILE, "
                                                 "e.g. torchvision's inception_v3_google-0cc3c7bd.pth)")
    if i3d:
        nets.i3d, nets.files["fvd"] = load_i3d(i3d, device), i3d
    else:
        nets.skipped["fvd"] = skipped("fvd", "no I3D TorchScript given (give --i3d-weights FILE, e.g. "
                                             "StyleGAN-V's i3d_torchscript.pt)")
    return nets
