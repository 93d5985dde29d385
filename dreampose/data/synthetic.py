"""Synthetic inputs for the demo and the benchmark: a key frame and a DensePose-like UV sequence.

Nothing here is a person or real DensePose output. The key frame is a flat coloured figure on a
gradient; the pose sequence is a torso, a head and four limbs swinging over time, each part
carrying U/V coordinates that run 0..1 across and along it (0 on the background), which is the
value layout of the authors' ``frame_N_densepose.npy`` files. That is enough to drive every stage
of the pipeline with shapes and value ranges the real inputs have.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def synthetic_key_frame(height: int = 640, width: int = 512) -> torch.Tensor:
    """A deterministic RGB picture ``[3,H,W]`` uint8: gradient background, simple clothed figure."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    yn, xn = y / max(height - 1, 1), x / max(width - 1, 1)
    img = np.stack([0.55 + 0.3 * xn, 0.6 + 0.2 * yn, 0.75 - 0.2 * xn], axis=-1)   # pale backdrop
    cx = width / 2

    def ellipse(cy, ry, rx, colour):
        mask = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        img[mask] = colour

    ellipse(0.62 * height, 0.30 * height, 0.22 * width, (0.70, 0.15, 0.20))   # dress
    stripes = (np.sin(y / max(height, 1) * 60) > 0.6) & (((x - cx) / (0.22 * width)) ** 2
                                                          + ((y - 0.62 * height) / (0.30 * height)) ** 2 <= 1)
    img[stripes] = (0.95, 0.9, 0.3)                                             # garment texture
    ellipse(0.38 * height, 0.14 * height, 0.15 * width, (0.15, 0.25, 0.55))   # top
    ellipse(0.17 * height, 0.08 * height, 0.08 * width, (0.93, 0.78, 0.65))   # head
    return torch.from_numpy((img.clip(0, 1) * 255).round().astype(np.uint8)).permute(2, 0, 1).contiguous()


def _segment_uv(x, y, p0, p1, radius):
    """U across and V along a thick segment p0→p1; mask of the points inside it."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    length2 = max(dx * dx + dy * dy, 1e-6)
    s = ((x - x0) * dx + (y - y0) * dy) / length2
    s_c = np.clip(s, 0, 1)
    px, py = x0 + s_c * dx, y0 + s_c * dy
    cross = ((x - x0) * dy - (y - y0) * dx) / math.sqrt(length2)   # signed distance from the axis
    mask = ((x - px) ** 2 + (y - py) ** 2) <= radius ** 2
    return mask, (cross / radius + 1) / 2, s_c


def synthetic_uv_sequence(frames: int = 8, height: int = 320, width: int = 256) -> torch.Tensor:
    """``[F,2,H,W]`` float32 UV, U then V in (0,1] on the body and 0 elsewhere, limbs swinging."""
    if frames < 1:
        raise ValueError("frames must be at least 1")
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, s = width / 2, min(height / 640, width / 512)
    out = np.zeros((frames, 2, height, width), np.float32)
    for f in range(frames):
        phase = 2 * math.pi * f / max(frames, 2)
        swing = 0.5 * math.sin(phase)
        u = np.zeros((height, width), np.float32)
        v = np.zeros((height, width), np.float32)

        def paint(mask, pu, pv):
            u[mask] = np.clip(pu[mask], 0.02, 1.0)
            v[mask] = np.clip(pv[mask], 0.02, 1.0)

        shoulder_y, hip_y = 0.30 * height, 0.58 * height
        for side in (-1, 1):  # limbs first, torso and head over them
            sh = (cx + side * 70 * s, shoulder_y)
            hand = (sh[0] + side * 150 * s * math.cos(1.2 + side * swing),
                    sh[1] + 150 * s * math.sin(1.2 + side * swing))
            paint(*_segment_uv(x, y, sh, hand, 22 * s))
            hip = (cx + side * 40 * s, hip_y)
            foot = (hip[0] + side * 30 * s + 80 * s * math.sin(side * swing), 0.95 * height)
            paint(*_segment_uv(x, y, hip, foot, 28 * s))
        rx, ry = 75 * s, (hip_y - shoulder_y) / 2 + 20 * s
        tx, ty = cx + 10 * s * math.sin(phase), (shoulder_y + hip_y) / 2
        torso = ((x - tx) / rx) ** 2 + ((y - ty) / ry) ** 2 <= 1
        paint(torso, (x - tx) / (2 * rx) + 0.5, (y - ty) / (2 * ry) + 0.5)
        hx, hy, hr = tx, 0.17 * height, 45 * s
        head = (x - hx) ** 2 + (y - hy) ** 2 <= hr ** 2
        paint(head, (x - hx) / (2 * hr) + 0.5, (y - hy) / (2 * hr) + 0.5)
        out[f, 0], out[f, 1] = u, v
    return torch.from_numpy(out)
