"""A synthetic "fashion video" world with exact ground truth, for training, tests and benchmarks.

A parametric 2D person (head, torso, arms, hands, legs, feet and, for dresses, a skirt) wears a
textured outfit on a plain background. Every part is a tapered superellipse around a bone with
its own chart: V runs 0→1 along the bone from the proximal to the distal tip, U 0→1 across it.
A pixel's colour is a function of (outfit, part, U, V) only (:func:`texture`), so the rendered
appearance is exactly consistent with the UV: the DensePose-style UV we emit is not an estimate
but the very coordinates the picture was painted from. Nothing is anti-aliased, so the body
mask read from the UV and the person found in the picture (:func:`silhouette`) agree pixel for
pixel; that is what lets the evaluation measure pose following on generated frames.

Pixel (row i, column j) is sampled at its centre (j + 0.5, i + 0.5). Pose parameters are listed in
:data:`POSE_PARAMS`; limb angles are radians from "hanging straight down", positive = away from
the body's midline (a positive elbow/knee bends the distal bone back towards it).
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import DreamPoseError
from ..files.atomic import write_json_atomic, write_npy_atomic
from ..pipeline.poses import prepare_frame_folder, uv_file_name
from ..pipeline.video import save_image, to_uint8, write_mp4
from ..settings import MOTIONS, SPLITS, SynthSettings, check_choice
from .dataset import MARKER, frame_file_name, write_marker

BACKGROUND: tuple[float, float, float] = (0.92, 0.92, 0.92)
PARTS: tuple[str, ...] = (
    "torso", "head",
    "upper_arm_left", "upper_arm_right", "lower_arm_left", "lower_arm_right", "hand_left", "hand_right",
    "upper_leg_left", "upper_leg_right", "lower_leg_left", "lower_leg_right", "foot_left", "foot_right",
    "skirt",
)
PATTERNS: tuple[str, ...] = ("plain", "stripes", "checks", "dots")
POSE_PARAMS: tuple[str, ...] = (
    "x",          # pelvis offset from the frame centre, a fraction of the frame width
    "y",          # pelvis offset, a fraction of the frame height (+ = down)
    "scale",      # body size; 1 = crown-to-sole 84 % of the frame height
    "lean",       # torso tilt from vertical (radians)
    "turn",       # -1 profile facing left, 0 facing the camera, +1 profile facing right
    "neck",       # head tilt relative to the torso
    "shoulder_left", "elbow_left", "shoulder_right", "elbow_right",
    "hip_left", "knee_left", "hip_right", "knee_right",
)
_P = {name: i for i, name in enumerate(POSE_PARAMS)}
_PART = {name: i + 1 for i, name in enumerate(PARTS)}
UV_MIN = 0.02                 # on-body U/V never go below this, so 0 means background exactly
FILL = 0.87                   # neutral crown-to-sole height as a share of the frame height (scale 1)
_MARGIN = 0.02                # the body's bounding box keeps this share of the frame free at each side
_SHADE = 0.18                 # cylinder shading: edges (U = 0 or 1) are this much darker than the middle
_SIDES = {"left": 1, "right": -1}   # the person's left is image +x when facing the camera

# Body in units of its standing height (≈ crown to sole); radii are half-widths.
_TORSO, _SHOULDER_HALF, _SHOULDER_DROP, _HIP_HALF = 0.29, 0.095, 0.025, 0.06
_ARM, _FOREARM, _HAND = 0.16, 0.145, 0.065
_THIGH, _SHIN = 0.235, 0.225
_HEAD = 0.165
# nominal (width, length) of each part's chart, so garment patterns have one size on the whole body
_CHART_SIZE = {"torso": (0.24, 0.36), "head": (0.12, 0.165), "upper_arm": (0.06, 0.19), "lower_arm": (0.05, 0.17),
               "hand": (0.05, 0.075), "upper_leg": (0.1, 0.28), "lower_leg": (0.075, 0.26), "foot": (0.06, 0.08),
               "skirt": (0.3, 0.3)}


# ---------------------------------------------------------------------------------------------- outfits

@dataclass(frozen=True)
class Outfit:
    """What a subject looks like: every colour is RGB in 0..1 and at least 0.2 darker than the
    background in some channel, so the person always stands out from it (see :func:`silhouette`)."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_long: bool
    top: tuple[float, float, float]        # garment colour
    accent: tuple[float, float, float]     # the pattern's second colour
    pattern: str                           # one of PATTERNS
    frequency: float                       # pattern cycles per body height
    sleeve: float                          # 0 sleeveless, 1 to the elbow, 2 to the wrist
    dress: bool                            # a skirt (top colour and pattern) instead of trousers
    dress_length: float                    # hem position along the leg in thigh lengths
    bottom: tuple[float, float, float]     # trousers / shorts colour
    leg_cover: float                       # 0 none, 1 to the knee, 2 to the ankle
    shoes: tuple[float, float, float]
    build: float                           # body width factor

    def to_dict(self) -> dict:
        return asdict(self)


_SKIN_TONES = ((0.96, 0.80, 0.69), (0.90, 0.72, 0.58), (0.78, 0.58, 0.43), (0.62, 0.44, 0.30),
               (0.45, 0.30, 0.20), (0.33, 0.22, 0.15))
_HAIR_COLOURS = ((0.08, 0.07, 0.06), (0.25, 0.16, 0.09), (0.45, 0.30, 0.16), (0.80, 0.66, 0.38),
                 (0.62, 0.25, 0.10), (0.55, 0.55, 0.55))
_BOTTOM_COLOURS = ((0.16, 0.24, 0.42), (0.10, 0.10, 0.12), (0.62, 0.54, 0.38), (0.35, 0.35, 0.37),
                   (0.30, 0.22, 0.16))


def _distinct(rgb) -> tuple[float, float, float]:
    """Darken a colour until some channel is ≥ 0.2 below the background (shading only darkens further)."""
    c = np.clip(np.asarray(rgb, np.float64), 0, 1)
    limit = min(BACKGROUND) - 0.2
    if c.min() > limit:
        c = c * (limit / c.min())
    return tuple(round(float(x), 4) for x in c)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DreamPoseError(f"a world seed must be a whole number ≥ 0, got {seed!r}")
    return int(seed)


def random_outfit(seed: int) -> Outfit:
    """A subject drawn from ``seed``: skin, hair, garment colours, pattern, sleeves, dress or trousers."""
    rng = np.random.default_rng([_check_seed(seed), 1])

    def jitter(c, amount=0.04):
        return np.clip(np.asarray(c) + rng.uniform(-amount, amount, 3), 0, 1)

    def hsv(h, s, v):
        return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v))

    skin_a = rng.integers(len(_SKIN_TONES) - 1)
    skin = (1 - (w := rng.random())) * np.asarray(_SKIN_TONES[skin_a]) + w * np.asarray(_SKIN_TONES[skin_a + 1])
    hue = rng.random()
    top = hsv(hue, rng.uniform(0.35, 0.9), rng.uniform(0.3, 0.85))
    if rng.random() < 0.5:   # a contrasting hue
        accent = hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.95))
    else:                    # a light or dark version of the same hue
        accent = hsv(hue, rng.uniform(0.05, 0.3), 0.97) if top.max() < 0.6 else hsv(hue, 0.6, 0.15)
    if np.abs(np.asarray(_distinct(top)) - np.asarray(_distinct(accent))).max() < 0.25:
        accent = np.where(top > 0.5, top - 0.4, top + 0.4)
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    dress = bool(rng.random() < 0.4)
    return Outfit(
        skin=_distinct(jitter(skin, 0.02)),
        hair=_distinct(jitter(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))])),
        hair_long=bool(rng.random() < 0.5),
        top=_distinct(top),
        accent=_distinct(accent),
        pattern=pattern,
        frequency=round(float(rng.uniform(8.0, 18.0)), 3),
        sleeve=float(rng.choice((0.0, 0.45, 1.0, 2.0))),
        dress=dress,
        dress_length=round(float(rng.uniform(0.75, 1.5)), 3),
        bottom=_distinct(jitter(_BOTTOM_COLOURS[rng.integers(len(_BOTTOM_COLOURS))] if rng.random() < 0.7
                                else hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.25, 0.7)))),
        leg_cover=float(rng.choice((0.6, 1.0, 2.0), p=(0.25, 0.15, 0.6))),
        shoes=_distinct(jitter(rng.choice(((0.08, 0.08, 0.08), (0.45, 0.25, 0.12), (0.85, 0.85, 0.85)))
                               if rng.random() < 0.8 else hsv(rng.random(), 0.7, 0.6))),
        build=round(float(rng.uniform(0.88, 1.12)), 3),
    )


def _part_kind(name: str) -> str:
    return name.rsplit("_", 1)[0] if name.endswith(("_left", "_right")) else name


def _garment(outfit: Outfit, kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The outfit's patterned fabric at chart points of one part kind, ``[N,3]``."""
    width, length = _CHART_SIZE[kind]
    a, b = u * (width * outfit.frequency), v * (length * outfit.frequency)
    if outfit.pattern == "stripes":
        second = (b % 1.0) < 0.5
    elif outfit.pattern == "checks":
        second = (np.floor(a) + np.floor(b)) % 2 == 1
    elif outfit.pattern == "dots":
        second = ((a % 1.0) - 0.5) ** 2 + ((b % 1.0) - 0.5) ** 2 < 0.28 ** 2
    else:
        second = np.zeros(u.shape, bool)
    return np.where(second[:, None], np.asarray(outfit.accent, np.float32), np.asarray(outfit.top, np.float32))


def _covered(v: np.ndarray, cover: float, colour, skin) -> np.ndarray:
    """Clothing from the proximal end down to V = ``cover`` (clamped to 0..1), skin beyond."""
    cover = min(max(cover, 0.0), 1.0)
    return np.where((v < cover)[:, None], np.asarray(colour, np.float32), np.asarray(skin, np.float32))


def _part_colour(outfit: Outfit, kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unshaded colour ``[N,3]`` of chart points of one part kind."""
    skin = np.asarray(outfit.skin, np.float32)
    if kind in ("torso", "skirt"):
        col = _garment(outfit, kind, u, v)
        if kind == "torso":   # neckline
            col = np.where(((v > 0.93) & (np.abs(u - 0.5) < 0.14))[:, None], skin, col)
        return col
    if kind == "upper_arm":
        return _covered(v, outfit.sleeve, _garment(outfit, kind, u, v), skin)
    if kind == "lower_arm":
        return _covered(v, outfit.sleeve - 1.0, _garment(outfit, kind, u, v), skin)
    if kind in ("upper_leg", "lower_leg"):
        cover = 0.0 if outfit.dress else outfit.leg_cover - (kind == "lower_leg")
        return _covered(v, cover, np.broadcast_to(np.asarray(outfit.bottom, np.float32), (u.size, 3)), skin)
    if kind == "foot":
        return np.broadcast_to(np.asarray(outfit.shoes, np.float32), (u.size, 3))
    if kind == "head":
        hair = (v > 0.8) | (outfit.hair_long & (v > 0.3) & (np.abs(u - 0.5) > 0.34))
        eyes = ((np.abs(u - 0.5) - 0.14) / 0.05) ** 2 + ((v - 0.6) / 0.035) ** 2 < 1
        col = np.where(hair[:, None], np.asarray(outfit.hair, np.float32), skin)
        return np.where((eyes & ~hair)[:, None], np.float32(0.1), col)
    return np.broadcast_to(skin, (u.size, 3))   # hands


def texture(outfit: Outfit, parts, u, v) -> np.ndarray:
    """RGB ``[...,3]`` float32 of body points given by part index (1..len(PARTS)) and chart U, V.

    The renderer paints every body pixel with exactly this, so appearance is a function of the
    chart position alone: the same garment point looks the same in every pose. Mild cylinder
    shading by U darkens the part's edges.
    """
    parts = np.asarray(parts)
    u = np.asarray(u, np.float32)
    v = np.asarray(v, np.float32)
    out = np.zeros((*parts.shape, 3), np.float32)
    for index in np.unique(parts):
        if index < 1 or index > len(PARTS):
            continue
        sel = parts == index
        pu, pv = u[sel], v[sel]
        shade = 1 - np.float32(_SHADE) * (2 * pu - 1) ** 2
        out[sel] = _part_colour(outfit, _part_kind(PARTS[index - 1]), pu, pv) * shade[:, None]
    return out


# ---------------------------------------------------------------------------------------------- motions

def neutral_pose() -> np.ndarray:
    """``[D]`` standing still, facing the camera, arms hanging slightly away from the body."""
    pose = np.zeros(len(POSE_PARAMS))
    pose[_P["scale"]] = 1.0
    pose[[_P["shoulder_left"], _P["shoulder_right"]]] = 0.15
    pose[[_P["elbow_left"], _P["elbow_right"]]] = 0.1
    pose[[_P["hip_left"], _P["hip_right"]]] = 0.05
    return pose


def _smooth_keys(rng, frames: int, low, high, every: tuple[float, float], step: float) -> np.ndarray:
    """``[F,len(low)]`` random key poses every few frames joined by a smooth cubic (C1) ease;
    each key moves at most ``step`` from the last, so no joint ever whips round."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    times, t = [0.0], 0.0
    while t < frames:
        t += rng.uniform(*every)
        times.append(t)
    keys = [rng.uniform(low, high)]
    for _ in times[1:]:
        keys.append(np.clip(keys[-1] + rng.uniform(-step, step, low.size), low, high))
    keys = np.asarray(keys)
    out = np.empty((frames, low.size))
    for f in range(frames):
        k = np.searchsorted(times, f, side="right") - 1
        s = (f - times[k]) / (times[k + 1] - times[k])
        s = s * s * (3 - 2 * s)
        out[f] = (1 - s) * keys[k] + s * keys[k + 1]
    return out


def random_motion(seed: int, frames: int, kind: str | None = None) -> np.ndarray:
    """``[F,len(POSE_PARAMS)]`` float64 pose parameters, smooth in time, from ``seed``.

    Time runs in frames (cycles of 16–44 frames), so a longer request continues the same motion
    and a 16–24 frame clip already shows clearly different poses. Every family also moves the
    root (drift, sway or bob) so the silhouette travels in the frame.
    """
    seed = _check_seed(seed)
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise DreamPoseError(f"a motion needs at least 1 frame, got {frames!r}")
    rng = np.random.default_rng([seed, 2])
    family = MOTIONS[rng.integers(len(MOTIONS))]
    if kind is not None:
        family = check_choice(kind, MOTIONS, "motion")
    t = np.arange(frames, dtype=np.float64)
    pose = np.tile(neutral_pose(), (frames, 1))
    col = {name: pose[:, i] for name, i in _P.items()}   # views: writing them fills pose

    def wave(period_lo, period_hi):
        return 2 * math.pi / rng.uniform(period_lo, period_hi), rng.uniform(0, 2 * math.pi)

    col["scale"][:] = rng.uniform(0.92, 1.04)
    direction = rng.choice((-1.0, 1.0))
    w_drift = 2 * math.pi / rng.uniform(48, 90)
    # the root starts moving at full speed, so a clip of any length shows it travelling
    col["x"][:] = rng.uniform(-0.08, 0.08) + direction * rng.uniform(0.12, 0.22) * np.sin(w_drift * t)

    if family == "walk":
        facing = direction
        w, ph = wave(16, 26)
        swing = np.sin(w * t + ph)
        a_leg, a_arm = rng.uniform(0.25, 0.4), rng.uniform(0.25, 0.45)
        col["turn"][:] = facing * rng.uniform(0.7, 1.0)
        col["lean"][:] = -facing * rng.uniform(0.0, 0.08)
        col["hip_left"][:] = facing * a_leg * swing
        col["hip_right"][:] = facing * a_leg * swing
        bend = rng.uniform(0.3, 0.7)
        col["knee_left"][:] = facing * bend * (1 - swing) / 2      # the knee bends as the leg goes back
        col["knee_right"][:] = -facing * bend * (1 + swing) / 2
        col["shoulder_left"][:] = -facing * a_arm * swing
        col["shoulder_right"][:] = -facing * a_arm * swing
        elbow = rng.uniform(0.2, 0.5)
        col["elbow_left"][:] = -facing * elbow
        col["elbow_right"][:] = facing * elbow
        col["y"][:] = -0.012 * np.abs(np.cos(w * t + ph))
    elif family == "sway":
        w, ph = wave(22, 38)
        s = np.sin(w * t + ph)
        col["lean"][:] = rng.uniform(0.06, 0.14) * s
        col["turn"][:] = rng.uniform(0.1, 0.35) * np.sin(w * t + ph + rng.uniform(0.5, 1.5))
        col["x"] += rng.uniform(0.04, 0.08) * s
        col["neck"][:] = -0.5 * col["lean"]
        for side, sign in _SIDES.items():
            col[f"shoulder_{side}"][:] = rng.uniform(0.15, 0.45) + rng.uniform(0.1, 0.35) * sign * s
            col[f"elbow_{side}"][:] = rng.uniform(0.1, 0.9)
            col[f"hip_{side}"][:] = 0.08 + 0.1 * sign * s
            col[f"knee_{side}"][:] = 0.12 * np.clip(sign * s, 0, None)
    elif family == "wave":
        side = rng.choice(list(_SIDES))
        other = "right" if side == "left" else "left"
        w_hand, ph = wave(10, 14)
        raise_w, _ = wave(28, 44)
        raise_ph = rng.uniform(0.3, 0.7) * math.pi                # the clip starts with the arm rising
        up = 0.5 - 0.5 * np.cos(raise_w * t + raise_ph)          # the arm goes up and comes down
        col[f"shoulder_{side}"][:] = 0.2 + up * rng.uniform(1.9, 2.5)
        col[f"elbow_{side}"][:] = up * (0.6 + 0.35 * np.sin(w_hand * t + ph))
        col[f"shoulder_{other}"][:] = rng.uniform(0.1, 0.3)
        col[f"elbow_{other}"][:] = rng.uniform(0.1, 0.6)
        col["lean"][:] = -_SIDES[side] * 0.06 * up
        col["turn"][:] = rng.uniform(-0.3, 0.3)
        col["neck"][:] = 0.1 * np.sin(w_hand * t / 2 + ph)
    elif family == "turn":
        w, ph = wave(26, 44)
        col["turn"][:] = np.sin(w * t + rng.choice((0.0, math.pi)))
        col["x"] += 0.05 * np.sin(w * t)
        for side in _SIDES:
            col[f"shoulder_{side}"][:] = rng.uniform(0.15, 0.5) + 0.15 * np.sin(w * 2 * t + ph)
            col[f"elbow_{side}"][:] = rng.uniform(0.2, 1.0)
            col[f"hip_{side}"][:] = rng.uniform(0.02, 0.12)
        col["lean"][:] = 0.05 * np.sin(w * t + ph)
    elif family == "dance":
        w, ph = wave(20, 32)
        lift = 0.5 - 0.5 * np.cos(w * t + ph)
        plie = 0.5 - 0.5 * np.cos(1.5 * w * t + ph)
        for side, sign in _SIDES.items():
            lag = rng.uniform(0, 1.2)
            arm = 0.5 - 0.5 * np.cos(w * t + ph + sign * lag)
            col[f"shoulder_{side}"][:] = 0.25 + rng.uniform(0.9, 1.8) * arm
            col[f"elbow_{side}"][:] = rng.uniform(0.0, 0.4) + rng.uniform(0.2, 1.0) * (1 - arm)
            col[f"hip_{side}"][:] = 0.1 + 0.35 * plie
            col[f"knee_{side}"][:] = 0.7 * plie
        col["y"][:] = 0.05 * plie
        col["lean"][:] = 0.12 * np.sin(w * t + ph) * (1 - lift)
        col["turn"][:] = rng.uniform(-0.4, 0.4) * np.sin(w * t / 2)
    else:   # "pose": a model striking random poses, eased between
        names = ("lean", "turn", "neck", "shoulder_left", "elbow_left", "shoulder_right", "elbow_right",
                 "hip_left", "knee_left", "hip_right", "knee_right")
        low = (-0.15, -0.8, -0.25, 0.0, -0.2, 0.0, -0.2, -0.05, -0.1, -0.05, -0.1)
        high = (0.15, 0.8, 0.25, 2.5, 1.9, 2.5, 1.9, 0.45, 0.6, 0.45, 0.6)
        keys = _smooth_keys(rng, frames, low, high, (9.0, 15.0), 1.0)
        for i, name in enumerate(names):
            col[name][:] = keys[:, i]
        for side in _SIDES:   # shins may point inwards a little, never cross
            col[f"knee_{side}"][:] = np.minimum(col[f"knee_{side}"], col[f"hip_{side}"] + 0.15)
        col["x"] += _smooth_keys(rng, frames, (-0.08,), (0.08,), (8.0, 14.0), 0.1)[:, 0]
    return pose


# ---------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class PartShape:
    """One drawn part in pixels: a tapered superellipse from ``tip0`` (V = 0) to ``tip1`` (V = 1).

    At axial position τ ∈ [−1,1] (τ = 2V − 1) the half-width is ``r(τ)·(1 − |τ|^n)^(1/n)`` with
    r interpolating ``r0`` → ``r1``; U = ½ + e / (2·half-width) for the signed distance e from the
    axis, measured as ``cross(axis direction, point − centre)``.
    """

    part: int
    tip0: tuple[float, float]
    tip1: tuple[float, float]
    r0: float
    r1: float
    n: float


def _dir(angle: float) -> np.ndarray:
    """Unit vector at ``angle`` from straight down, positive towards image +x."""
    return np.array([math.sin(angle), math.cos(angle)])


def _skeleton(outfit: Outfit, pose: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray, float, float, float]]:
    """Parts in draw order, in body units with the pelvis at the origin (image axes: y down)."""
    p = {name: float(pose[i]) for name, i in _P.items()}
    turn = max(-1.0, min(1.0, p["turn"]))
    breadth = 0.25 + 0.75 * math.cos(turn * math.pi / 2)     # shoulders and hips close up in profile
    girth = (0.6 + 0.4 * breadth) * outfit.build             # a torso seen from the side is thinner
    lean = p["lean"]
    down = _dir(lean)
    up, across = -down, np.array([math.cos(lean), -math.sin(lean)])   # across: image +x when upright
    pelvis = np.zeros(2)
    neck = pelvis + _TORSO * up
    limbs: dict[str, list] = {}
    for side, s in _SIDES.items():
        shoulder = neck - _SHOULDER_DROP * up + s * _SHOULDER_HALF * breadth * outfit.build * across
        a_upper = lean + s * p[f"shoulder_{side}"]
        elbow = shoulder + _ARM * _dir(a_upper)
        a_lower = a_upper - s * p[f"elbow_{side}"]
        wrist = elbow + _FOREARM * _dir(a_lower)
        hand_end = wrist + _HAND * _dir(a_lower)
        hip = pelvis + s * _HIP_HALF * breadth * outfit.build * across
        l_upper = s * p[f"hip_{side}"]
        knee = hip + _THIGH * _dir(l_upper)
        l_lower = l_upper - s * p[f"knee_{side}"]
        ankle = knee + _SHIN * _dir(l_lower)
        foot_len = 0.05 + 0.05 * abs(turn)                   # a foot seen from the side is longer
        toe = ankle + foot_len * _dir(l_lower + turn * 1.3)
        limbs[side] = {
            "arm": [("upper_arm", shoulder - 0.018 * _dir(a_upper), elbow + 0.012 * _dir(a_upper), 0.031, 0.026, 3.0),
                    ("lower_arm", elbow - 0.012 * _dir(a_lower), wrist + 0.006 * _dir(a_lower), 0.025, 0.02, 3.0),
                    ("hand", wrist - 0.01 * _dir(a_lower), hand_end, 0.021, 0.024, 2.2)],
            "leg": [("upper_leg", hip - 0.02 * _dir(l_upper), knee + 0.02 * _dir(l_upper), 0.052, 0.038, 3.0),
                    ("lower_leg", knee - 0.015 * _dir(l_lower), ankle + 0.01 * _dir(l_lower), 0.037, 0.027, 3.0),
                    ("foot", ankle - 0.012 * _dir(l_lower + turn * 1.3), toe, 0.027, 0.03, 2.2)],
            "hip": hip, "knee": knee, "ankle": ankle,
        }
    far = "left" if turn > 0 else "right"    # turning right (+) takes the person's left side away
    near = "right" if far == "left" else "left"
    shapes = []

    def add(side, group):
        for kind, a, b, r0, r1, n in limbs[side][group]:
            shapes.append((f"{kind}_{side}", a, b, r0 * outfit.build, r1 * outfit.build, n))

    add(far, "leg")
    add(near, "leg")
    if outfit.dress:
        def along_leg(side):   # the point dress_length thigh-lengths down the leg
            d = outfit.dress_length
            leg = limbs[side]
            if d <= 1:
                return leg["hip"] + d * (leg["knee"] - leg["hip"])
            return leg["knee"] + min((d - 1) * _THIGH / _SHIN, 1.0) * (leg["ankle"] - leg["knee"])
        hem_l, hem_r = along_leg("left"), along_leg("right")
        hem = (hem_l + hem_r) / 2
        waist = pelvis + 0.05 * up
        r0 = (_HIP_HALF * breadth + 0.055) * outfit.build
        r1 = max(0.5 * float(np.linalg.norm(hem_l - hem_r)) + 0.05 * outfit.build, 1.3 * r0)
        axis = (hem - waist) / max(float(np.linalg.norm(hem - waist)), 1e-9)
        shapes.append(("skirt", waist, hem + 0.02 * axis, r0, r1, 8.0))
    turned = abs(turn) > 0.25
    if turned:
        add(far, "arm")
    shapes.append(("torso", pelvis - 0.05 * up, neck + 0.02 * up, (_HIP_HALF + 0.05) * girth,
                   (_SHOULDER_HALF + 0.03) * girth, 4.0))
    for side in ((near,) if turned else ("left", "right")):
        add(side, "arm")
    head_up = -_dir(lean + p["neck"])
    shapes.append(("head", neck - 0.01 * head_up, neck + _HEAD * head_up, 0.032, 0.062, 2.2))
    return shapes


def _bounds(shapes) -> tuple[float, float, float, float]:
    """A box that holds every shape (tips ± the larger radius): x0, y0, x1, y1."""
    pts = np.array([[*a, *b, max(r0, r1)] for _, a, b, r0, r1, _ in shapes])
    xs, ys, r = pts[:, [0, 2]], pts[:, [1, 3]], pts[:, 4:]
    return (float((xs - r).min()), float((ys - r).min()), float((xs + r).max()), float((ys + r).max()))


_NEUTRAL_OUTFIT = Outfit(skin=(0.8, 0.6, 0.5), hair=(0.1, 0.1, 0.1), hair_long=False, top=(0.5, 0.1, 0.1),
                         accent=(0.1, 0.1, 0.5), pattern="plain", frequency=10.0, sleeve=1.0, dress=False,
                         dress_length=1.0, bottom=(0.1, 0.1, 0.3), leg_cover=2.0, shoes=(0.1, 0.1, 0.1), build=1.0)
_NEUTRAL_TIPS = np.array([[*a, *b] for _, a, b, *_ in _skeleton(_NEUTRAL_OUTFIT, neutral_pose())])
# crown (head tip) to sole (foot tip): the standing figure's exact top and bottom
_NEUTRAL_TOP, _NEUTRAL_BOTTOM = float(_NEUTRAL_TIPS[:, [1, 3]].min()), float(_NEUTRAL_TIPS[:, [1, 3]].max())


def _placed(outfit: Outfit, pose, height: int, width: int):
    """Shapes in pixels before fitting, the pelvis position, and the shrink this pose alone needs."""
    pose = np.asarray(pose, np.float64)
    if pose.shape != (len(POSE_PARAMS),):
        raise DreamPoseError(f"a pose has {len(POSE_PARAMS)} parameters {POSE_PARAMS}, got shape {pose.shape}")
    y0, y1 = _NEUTRAL_TOP, _NEUTRAL_BOTTOM
    unit = FILL * height * max(float(pose[_P["scale"]]), 0.05) / (y1 - y0)
    origin = np.array([width / 2 + pose[_P["x"]] * width,
                       height / 2 - unit * (y0 + y1) / 2 + pose[_P["y"]] * height])
    shapes = [(k, origin + unit * a, origin + unit * b, unit * r0, unit * r1, n)
              for k, a, b, r0, r1, n in _skeleton(outfit, pose)]
    bx0, by0, bx1, by1 = _bounds(shapes)
    mx, my = max(_MARGIN * width, 1.0), max(_MARGIN * height, 1.0)
    need = min(1.0, (width - 2 * mx) / (bx1 - bx0), (height - 2 * my) / (by1 - by0))
    return shapes, origin, need


def fit_shrink(outfit: Outfit, motion: np.ndarray, height: int, width: int) -> float:
    """The one scale factor (≤ 1) that lets every pose of ``motion`` fit in the frame."""
    return min(_placed(outfit, pose, height, width)[2] for pose in np.asarray(motion, np.float64).reshape(
        -1, len(POSE_PARAMS)))


def part_shapes(outfit: Outfit, pose: np.ndarray, height: int, width: int,
                shrink: float | None = None) -> list[PartShape]:
    """The parts of one pose in pixels, in draw order (later parts occlude earlier ones).

    Body size comes from ``scale`` (crown-to-sole = FILL·height at 1), position from ``x``/``y``.
    The figure is shrunk about the pelvis by ``shrink`` (default: what this pose needs to fit;
    :func:`render_video` uses one factor for the whole clip, so the size never pumps) and then
    shifted as little as needed to keep its bounding box inside the frame with a small margin,
    which is continuous in the pose, so motions stay smooth.
    """
    shapes, origin, need = _placed(outfit, pose, height, width)
    shrink = need if shrink is None else min(float(shrink), need)
    shapes = [(k, origin + shrink * (a - origin), origin + shrink * (b - origin), shrink * r0, shrink * r1, n)
              for k, a, b, r0, r1, n in shapes]
    bx0, by0, bx1, by1 = _bounds(shapes)
    mx, my = max(_MARGIN * width, 1.0), max(_MARGIN * height, 1.0)
    shift = np.array([max(mx - bx0, 0.0) + min(width - mx - bx1, 0.0),
                      max(my - by0, 0.0) + min(height - my - by1, 0.0)])
    return [PartShape(_PART[k], (float(a[0] + shift[0]), float(a[1] + shift[1])),
                      (float(b[0] + shift[0]), float(b[1] + shift[1])), float(r0), float(r1), float(n))
            for k, a, b, r0, r1, n in shapes]


def chart(shape: PartShape, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inside, U, V) of points (x, y) in pixels for one part; U, V unclipped, meaningful inside."""
    ax, ay = shape.tip0
    bx, by = shape.tip1
    length = max(math.hypot(bx - ax, by - ay), 1e-6)
    dx, dy = (bx - ax) / length, (by - ay) / length
    cx, cy = (ax + bx) / 2, (ay + by) / 2
    px, py = x - cx, y - cy
    tau = (px * dx + py * dy) / (length / 2)
    e = dx * py - dy * px
    radius = shape.r0 * (1 - tau) / 2 + shape.r1 * (1 + tau) / 2
    half = radius * np.clip(1 - np.abs(tau) ** shape.n, 0, None) ** (1 / shape.n)
    inside = (np.abs(tau) < 1) & (np.abs(e) < half)
    u = 0.5 + e / (2 * np.maximum(half, 1e-6))
    return inside, u, (tau + 1) / 2


def _draw(shapes: list[PartShape], height: int, width: int, parts, u, v) -> None:
    """Paint the shapes into one frame's maps, each only over its bounding box."""
    for shape in shapes:
        r = max(shape.r0, shape.r1)
        xs = (shape.tip0[0], shape.tip1[0])
        ys = (shape.tip0[1], shape.tip1[1])
        c0, c1 = max(math.floor(min(xs) - r), 0), min(math.ceil(max(xs) + r) + 1, width)
        r0_, r1_ = max(math.floor(min(ys) - r), 0), min(math.ceil(max(ys) + r) + 1, height)
        if c0 >= c1 or r0_ >= r1_:
            continue
        y, x = np.mgrid[r0_:r1_, c0:c1].astype(np.float64)
        inside, pu, pv = chart(shape, x + 0.5, y + 0.5)
        parts[r0_:r1_, c0:c1][inside] = shape.part
        u[r0_:r1_, c0:c1][inside] = np.clip(pu[inside], UV_MIN, 1.0)
        v[r0_:r1_, c0:c1][inside] = np.clip(pv[inside], UV_MIN, 1.0)


# ---------------------------------------------------------------------------------------------- rendering

@dataclass
class WorldVideo:
    """A rendered clip with its exact ground truth."""

    frames: torch.Tensor   # [F,3,H,W] float32 0..1
    uv: torch.Tensor       # [F,2,H,W] float32; on the body in [UV_MIN,1], exactly 0 on the background
    parts: torch.Tensor    # [F,H,W] int64 part index (0 = background, i+1 = PARTS[i])

    def __len__(self) -> int:
        return self.frames.shape[0]


def _check_size(height, width) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 32:
            raise DreamPoseError(f"the world's frame {name} must be a whole number ≥ 32, got {value!r}")


def render_video(outfit: Outfit, motion: np.ndarray, height: int, width: int) -> WorldVideo:
    """Render every pose of ``motion`` (``[F,D]``, see :func:`random_motion`) at ``height``×``width``."""
    _check_size(height, width)
    motion = np.asarray(motion, np.float64)
    if motion.ndim == 1:
        motion = motion[None]
    if motion.ndim != 2 or motion.shape[1] != len(POSE_PARAMS) or motion.shape[0] < 1:
        raise DreamPoseError(f"a motion is [frames ≥ 1, {len(POSE_PARAMS)}] pose parameters, got shape {motion.shape}")
    if not np.isfinite(motion).all():
        raise DreamPoseError("the motion contains NaN or infinite pose parameters")
    count = motion.shape[0]
    parts = np.zeros((count, height, width), np.int64)
    uv = np.zeros((count, 2, height, width), np.float32)
    shrink = fit_shrink(outfit, motion, height, width)
    for f in range(count):
        _draw(part_shapes(outfit, motion[f], height, width, shrink), height, width, parts[f], uv[f, 0], uv[f, 1])
    frames = np.empty((count, height, width, 3), np.float32)
    frames[:] = np.asarray(BACKGROUND, np.float32)
    body = parts > 0
    frames[body] = texture(outfit, parts[body], uv[:, 0][body], uv[:, 1][body])
    return WorldVideo(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(uv),
                      torch.from_numpy(parts))


def jitter_uv(uv: torch.Tensor, *, shift: int = 1, noise: float = 0.03, seed: int = 0) -> torch.Tensor:
    """The exact UV ``[F,2,H,W]`` as a DensePose estimator would see it: each frame moved by a random whole
    number of pixels (−``shift`` … ``shift`` in x and y, rolled: the world's frame edges are background) and,
    on the body, Gaussian noise of
    std ``noise`` on U and V (kept in ``UV_MIN`` … 1, so the body mask is the moved one). Seeded, CPU."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(uv)
    for f in range(uv.shape[0]):
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
        moved = torch.roll(uv[f], (dy, dx), dims=(-2, -1))
        on = (moved != 0).any(0, keepdim=True)
        noisy = (moved + noise * torch.randn(moved.shape, generator=g)).clamp(UV_MIN, 1.0)
        out[f] = torch.where(on, noisy, torch.zeros_like(noisy))
    return out


def body_mask(uv: torch.Tensor) -> torch.Tensor:
    """``[...,2,H,W]`` → ``[...,H,W]`` bool: where the body is (U or V non-zero)."""
    return (uv != 0).any(dim=-3)


def silhouette(frames: torch.Tensor, threshold: float = 0.08) -> torch.Tensor:
    """``[...,3,H,W]`` 0..1 → ``[...,H,W]`` bool: pixels differing from BACKGROUND by more than
    ``threshold`` in some channel. On a rendered frame this is exactly the body (every outfit
    colour is ≥ 0.2 away from the background), so on generated frames it finds the person."""
    bg = torch.tensor(BACKGROUND, dtype=frames.dtype, device=frames.device).view(3, 1, 1)
    return (frames - bg).abs().amax(dim=-3) > threshold


# ---------------------------------------------------------------------------------------------- datasets

_OWN_FILES = (re.compile(r"^frame_(\d+)\.png$"), re.compile(r"^frame_(\d+)_densepose\.npy$"))
_MP4_NAME = "video.mp4"
PARTIAL = "synth.partial.json"   # an unfinished video folder's job, so a later run knows its own leftovers
_FOLDER = re.compile(r"^world_(\d{4,})$")
MAX_VIDEOS = 2 ** 32             # world_seeds numbers the videos of a split in 32 bits
MEMORY_PER_PIXEL = 64            # peak bytes of memory per frame pixel while one video is rendered and written
DISK_PER_PIXEL = 12              # bytes on disk per frame pixel, at most: UV npy 8, PNG up to 3, mp4 about 1


def world_job(*, seed: int, frames: int, height: int, width: int, fps: float, split: str) -> dict:
    """What decides a synth video's files: a folder is kept or resumed only for this same job."""
    return {"seed": seed, "frames": frames, "height": height, "width": width, "fps": fps, "split": split}


def world_folder(root: str, split: str, index: int) -> str:
    return os.path.join(root, split, f"world_{index:04d}")


def in_world_folder(path: str, root: str, split: str, videos: int) -> bool:
    """Whether ``path`` lies in one of the video folders that ``write_world_dataset(root, split=split,
    videos=videos)`` writes (whose ``frame_N`` files it replaces), also through links."""
    parent = os.path.dirname(os.path.abspath(path))
    real = os.path.realpath(parent)
    for name in {os.path.basename(parent), os.path.basename(real)}:
        m = _FOLDER.match(name)
        if (m and int(m.group(1)) < videos and os.path.basename(world_folder(root, split, int(m.group(1)))) == name
                and os.path.realpath(os.path.join(root, split, name)) == real):
            return True
    return False


def write_video_folder(folder: str, video: WorldVideo, *, fps: float = SynthSettings.fps, mp4: str | None = None,
                       info: dict | None = None, job: dict | None = None) -> str:
    """One prepared video folder (``frame_N.png`` + ``frame_N_densepose.npy``, marker last).

    Frame files an earlier, interrupted run left in ``folder`` are replaced, never mixed in.
    ``mp4``: also write the frames as a video there (to feed ``prepare`` in tests). ``job``: recorded in
    :data:`PARTIAL` until the marker is written, so a rerun knows an interrupted folder as its own.
    """
    count, _, height, width = video.frames.shape
    if tuple(video.uv.shape) != (count, 2, height, width):
        raise DreamPoseError(f"UV {tuple(video.uv.shape)} does not match the frames {tuple(video.frames.shape)}")
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, MARKER)):
        os.remove(os.path.join(folder, MARKER))   # unfinished until the new marker is written
    if job is not None:
        write_json_atomic(os.path.join(folder, PARTIAL), {"job": job}, sort_keys=True)
    for pattern in _OWN_FILES:
        prepare_frame_folder(folder, pattern, overwrite=True)
    pictures = to_uint8(video.frames.permute(0, 2, 3, 1))
    for i in range(count):
        save_image(pictures[i], os.path.join(folder, frame_file_name(i)))
        write_npy_atomic(os.path.join(folder, uv_file_name(i)), video.uv[i].numpy().astype(np.float32))
    if mp4:
        write_mp4(pictures, mp4, fps)
    meta = dict(info or {})
    meta.update(frames=count, height=height, width=width, source="synthetic world", fps=fps)   # these always hold
    path = write_marker(folder, **meta)
    _remove_partial(folder)
    return path


def _remove_partial(folder: str) -> None:
    try:
        os.remove(os.path.join(folder, PARTIAL))
    except FileNotFoundError:
        pass


def world_seeds(seed: int, split: str, index: int) -> tuple[int, int]:
    """(outfit seed, motion seed) of video ``index`` of ``split``: distinct numbers for every
    (seed, split, index, role), so no two splits ever share a subject or a motion."""
    seed = _check_seed(seed)
    check_choice(split, SPLITS, "split")
    if not 0 <= index < MAX_VIDEOS:
        raise DreamPoseError(f"video index out of range: {index}")
    base = ((seed * 2 ** 32 + index) * len(SPLITS) + SPLITS.index(split)) * 2
    return base, base + 1


def _read_json(path: str):
    """The JSON in ``path``; None when there is no such file, ``...`` when it is unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ...


def _folder_state(folder: str, job: dict) -> tuple[str, list[str]]:
    """(state, the files that decide it): ``free`` (nothing of anyone's to replace, or this job's unfinished folder),
    ``done`` (finished by this very job), ``other`` (another synth run's video), ``foreign`` (frame
    files that no synth run recorded: replacing them needs ``force``)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DreamPoseError(f"{folder} is a file where synth writes a video folder; move it away or give "
                             "another --out")
    info = _read_json(os.path.join(folder, MARKER))
    if info is not None:
        same = isinstance(info, dict) and all(info.get(k) == v for k, v in job.items())
        return ("done" if same else "other"), [MARKER]
    if not os.path.isdir(folder):
        return "free", []
    partial = _read_json(os.path.join(folder, PARTIAL))
    if partial is not None:
        return ("free" if isinstance(partial, dict) and partial.get("job") == job else "other"), [PARTIAL]
    theirs = sorted(n for n in os.listdir(folder) if n == _MP4_NAME or any(p.match(n) for p in _OWN_FILES))
    return ("foreign" if theirs else "free"), theirs


def _existing_folders(root: str, split: str, videos: int) -> list[int]:
    """Indices below ``videos`` whose folder exists: read from the split's listing, so the check of a
    huge request does not cost one look-up per video."""
    try:
        names = os.listdir(os.path.join(root, split))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = (int(m.group(1)) for n in names if (m := _FOLDER.match(n)))
    return sorted(k for k in set(found) if k < videos and os.path.lexists(world_folder(root, split, k)))


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def free_memory() -> int | None:
    """Bytes this process may still allocate (the system's available memory, a container's limit,
    ``ulimit -v``), None when unknown."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not limits and hasattr(os, "sysconf"):   # no /proc (macOS): the physical memory at least
        try:
            limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    try:   # a container's limit (cgroup v2); the file cache it counts can be dropped, so it is not in use
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            text, used = f.read().strip(), int(g.read().strip())
        if text != "max":
            with open("/sys/fs/cgroup/memory.stat") as f:
                cache = [int(line.split()[1]) for line in f if line.startswith("inactive_file ")]
            limits.append(int(text) - used + (cache[0] if cache else 0))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                used = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")]
            limits.append(soft - (used[0] if used else 0))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return max(min(limits), 0) if limits else None


def _free_disk(path: str) -> int | None:
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_world_limits(root: str, *, videos: int, frames: int, height: int, width: int, mp4: bool = False,
                       finished: int = 0) -> None:
    """Before any work: one video fits in memory, and the videos still to write fit on the disk; a
    request beyond either would only fail after a long time (or take the machine's memory)."""
    if videos > MAX_VIDEOS:
        raise DreamPoseError(f"at most {MAX_VIDEOS} videos per split (their seeds are numbered in 32 bits), got "
                             f"{videos}; ask for fewer --videos")
    pixels = frames * height * width
    need, free = pixels * MEMORY_PER_PIXEL, free_memory()
    if free is not None and need > free:
        raise DreamPoseError(f"one video of {frames} frames at {width}x{height} needs about {_human(need)} of memory "
                             f"and only {_human(free)} is available; ask for fewer --frames or a smaller size")
    need = (videos - finished) * (pixels * (DISK_PER_PIXEL + (1 if mp4 else 0)) + frames * 512 + 8192)
    free = _free_disk(root)
    if free is not None and need > free:
        raise DreamPoseError(f"{videos - finished} video(s) of {frames} frames at {width}x{height} need about "
                             f"{_human(need)} on disk and only {_human(free)} is free at {root}; ask for fewer "
                             "--videos or --frames, a smaller size, or write somewhere else")


def rendered_truth(info: dict) -> WorldVideo | None:
    """A synthetic-world video folder's clip rendered again from its marker (``info``: outfit and motion
    seeds, motion family, size, frames), with the exact part index of every pixel that the folder's
    files do not store; None for a folder that is not one of the world's."""
    need = ("outfit_seed", "motion_seed", "motion", "frames", "height", "width")
    if info.get("source") != "synthetic world" or not all(k in info for k in need):
        return None
    motion = random_motion(int(info["motion_seed"]), int(info["frames"]), str(info["motion"]))
    return render_video(random_outfit(int(info["outfit_seed"])), motion, int(info["height"]), int(info["width"]))


def write_world_dataset(root: str, *, videos: int, frames: int, height: int, width: int,
                        seed: int = SynthSettings.seed, split: str = SynthSettings.split, mp4: bool = False,
                        progress=None, fps: float = SynthSettings.fps, force: bool = False) -> list[str]:
    """``root/split/world_{k:04d}/`` for k < ``videos``; folders already finished by this same job (same
    seed, size, frames and rate) are kept, its interrupted ones redone (resume).

    Motion families cycle through :data:`MOTIONS` (from a seed-dependent start), so every family
    is represented. ``progress(done, total, folder, skipped)`` is called after each video.

    Raises:
        DreamPoseError: before anything is written, when a folder holds another run's video (other seed,
            size, frames or rate) or frame files no synth run recorded, and not ``force`` (which replaces
            them); or when one video would not fit in memory or all of them on the disk.
    """
    for name, value, least in (("videos", videos, 1), ("frames", frames, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise DreamPoseError(f"{name} must be a whole number ≥ {least}, got {value!r}")
    _check_size(height, width)
    world_seeds(seed, split, 0)   # checks seed and split before any work
    if os.path.exists(root) and not os.path.isdir(root):
        raise DreamPoseError(f"{root!r} is a file; give a folder for the synthetic dataset")
    if os.path.exists(os.path.join(root, split)) and not os.path.isdir(os.path.join(root, split)):
        raise DreamPoseError(f"{os.path.join(root, split)!r} is a file; move it away or give another folder")
    first = int(np.random.default_rng([seed, 3]).integers(len(MOTIONS)))
    job = world_job(seed=seed, frames=frames, height=height, width=width, fps=fps, split=split)
    keep = set()
    for k in _existing_folders(root, split, videos):   # decided for every folder before the first one is written
        folder = world_folder(root, split, k)
        state, names = _folder_state(folder, job)
        if state == "done":
            keep.add(k)
        elif state == "other" and not force:
            raise DreamPoseError(f"{folder} holds a video of another synth run (other seed, size, frames or rate); "
                                 "pass --force to replace it, or give another --out")
        elif state == "foreign" and not force:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise DreamPoseError(f"{folder} holds {names[0]}{more} that no synth run wrote for this job; pass "
                                 "--force to replace them, or give another --out")
    check_world_limits(root, videos=videos, frames=frames, height=height, width=width, mp4=mp4, finished=len(keep))
    folders = [world_folder(root, split, k) for k in range(videos)]
    for k, folder in enumerate(folders):
        skipped = k in keep
        if skipped:
            _remove_partial(folder)   # a run stopped between its marker and this clean-up
        else:
            outfit_seed, motion_seed = world_seeds(seed, split, k)
            kind = MOTIONS[(first + k) % len(MOTIONS)]
            outfit = random_outfit(outfit_seed)
            video = render_video(outfit, random_motion(motion_seed, frames, kind), height, width)
            write_video_folder(folder, video, fps=fps, mp4=os.path.join(folder, _MP4_NAME) if mp4 else None,
                               info={"outfit": outfit.to_dict(), "motion": kind, "outfit_seed": outfit_seed,
                                     "motion_seed": motion_seed, "split": split, "index": k, "seed": seed},
                               job=job)
            del video   # before the next one is rendered: one video in memory at a time
        if progress is not None:
            progress(k + 1, videos, folder, skipped)
    return folders
