"""DensePose UV from frames (dreampose/data/densepose.py) and its nodes.

A tiny TorchScript model with the real export's call signature (one ``[3,H,W]`` uint8 image) and
output layout (``pred_boxes [N,4] XYXY, coarse_segm [N,2,S,S], fine_segm [N,25,S,S], u, v``) is
scripted, saved as a ``.torchscript`` file and loaded through our loader. Its chart values are
piecewise constant, so the expected UV at the box is worked out by hand below: a 4×4 chart resized
×2 with bilinear (align_corners False) keeps a step between chart columns 1|2 at box columns 3|4
(box column 3 samples chart x=1.25: 75 % of the left value; column 4 samples x=1.75).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from dreampose.data import densepose as dp
from dreampose.errors import DreamPoseError
from dreampose.pipeline.poses import load_uv_folder, make_pose_windows, save_uv_folder

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

H, W, S = 24, 32, 4
U5, V5, U7, V7, DISTRACT = 0.25, 0.75, 0.6, 0.1, 0.9


# ---------------------------------------------------------------------------------------------- fake exports

class FakeExport(torch.nn.Module):
    """Fixed detections (×``scale``, in the pixels of the image it is given); every box moves right by
    the value of the input's channel 0 at pixel (0,0) (blue, when the frame reaches the model in BGR
    order); with ``relative``, boxes are fractions of the (padded) input size."""

    def __init__(self, boxes, coarse, fine, u, v, relative: bool = False, shift: bool = True, scale: float = 1.0):
        super().__init__()
        self.register_buffer("boxes", boxes)
        self.register_buffer("coarse", coarse)
        self.register_buffer("fine", fine)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.relative = relative
        self.shift = shift
        self.scale = scale

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
        assert image.dtype == torch.uint8, "the export takes uint8"
        assert image.dim() == 3 and image.size(0) == 3, "the export takes one CHW image"
        assert image.size(1) % 32 == 0 and image.size(2) % 32 == 0, "padded to the FPN's multiple of 32"
        boxes = self.boxes * self.scale
        if self.relative:
            size = torch.tensor([image.size(2), image.size(1), image.size(2), image.size(1)], dtype=torch.float32)
            boxes = boxes * size
        if self.shift:
            s = image[0, 0, 0].to(torch.float32)
            z = torch.zeros_like(s)
            boxes = boxes + torch.stack([s, z, s, z])
        return boxes, self.coarse, self.fine, self.u, self.v


class FakeDictExport(FakeExport):
    """dajes/DensePose-TorchScript style: a dict with scores."""

    def __init__(self, scores, *args):
        super().__init__(*args)
        self.register_buffer("scores", scores)

    def forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        return {"pred_boxes": self.boxes, "scores": self.scores, "pred_densepose_coarse_segm": self.coarse,
                "pred_densepose_fine_segm": self.fine, "pred_densepose_u": self.u, "pred_densepose_v": self.v}


def person_a():
    """Chart: left half (columns 0-1) background in coarse; fine part 5 on top rows, 7 on bottom rows;
    U/V constant per part, other parts hold distractor values."""
    coarse = torch.zeros(2, S, S)
    coarse[0, :, :2] = 1.0
    coarse[1, :, 2:] = 1.0
    fine = torch.zeros(25, S, S)
    fine[5, :2] = 3.0
    fine[7, 2:] = 3.0
    u = torch.full((25, S, S), DISTRACT)
    v = torch.full((25, S, S), DISTRACT)
    u[5], v[5], u[7], v[7] = U5, V5, U7, V7
    return coarse, fine, u, v


def person_b():
    """All foreground, part 2 everywhere, U=0.5, V=0.125."""
    coarse = torch.zeros(2, S, S)
    coarse[1] = 1.0
    fine = torch.zeros(25, S, S)
    fine[2] = 1.0
    u = torch.full((25, S, S), DISTRACT)
    v = torch.full((25, S, S), DISTRACT)
    u[2], v[2] = 0.5, 0.125
    return coarse, fine, u, v


def stack(*people):
    return [torch.stack(t) for t in zip(*people)]


def save_script(module: torch.nn.Module, path) -> str:
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


BOX_A = [10.6, 5.2, 18.9, 13.9]     # → int box x=10, y=5, w=trunc(8.3)=8, h=trunc(8.7)=8
BOX_B = [0.0, 0.0, 12.0, 16.0]      # larger: 12×16


def expected_a(x0=10, y0=5, height=H, width=W):
    """Hand-derived UV of person A with its 8×8 box at (x0, y0): right half of the box is body,
    top half part 5, bottom half part 7; everything else 0 (clipped at the frame)."""
    uv = torch.zeros(2, height + 16, width + 16)
    labels = torch.zeros(height + 16, width + 16, dtype=torch.uint8)
    ox, oy = x0 + 8, y0 + 8  # work in a padded canvas so negative / overflowing boxes are easy
    uv[0, oy:oy + 4, ox + 4:ox + 8], uv[1, oy:oy + 4, ox + 4:ox + 8] = U5, V5
    uv[0, oy + 4:oy + 8, ox + 4:ox + 8], uv[1, oy + 4:oy + 8, ox + 4:ox + 8] = U7, V7
    labels[oy:oy + 4, ox + 4:ox + 8] = 5
    labels[oy + 4:oy + 8, ox + 4:ox + 8] = 7
    return uv[:, 8:8 + height, 8:8 + width], labels[8:8 + height, 8:8 + width]


def expected_b():
    uv = torch.zeros(2, H, W)
    uv[0, 0:16, 0:12], uv[1, 0:16, 0:12] = 0.5, 0.125
    labels = torch.zeros(H, W, dtype=torch.uint8)
    labels[0:16, 0:12] = 2
    return uv, labels


@pytest.fixture(scope="module")
def two_people(tmp_path_factory) -> str:
    """A (smaller, listed first = best score) and B (larger)."""
    boxes = torch.tensor([BOX_A, BOX_B])
    return save_script(FakeExport(boxes, *stack(person_a(), person_b())),
                       tmp_path_factory.mktemp("dp") / "two.torchscript")


@pytest.fixture(scope="module")
def one_person(tmp_path_factory) -> str:
    return save_script(FakeExport(torch.tensor([BOX_A]), *stack(person_a())),
                       tmp_path_factory.mktemp("dp") / "one.torchscript")


def frames(n=1, blue=None, red=50):
    """RGB float frames; pixel (0,0) has red=50/255 and blue=k/255 (the fake's box shift when fed BGR)."""
    imgs = torch.zeros(n, H, W, 3)
    for k in range(n):
        imgs[k, 0, 0, 0] = red / 255
        imgs[k, 0, 0, 2] = (k if blue is None else blue) / 255
    return imgs


def run(path, images, **kw):
    kw.setdefault("detect_resolution", 0)
    return dp.estimate_uv(dp.load_densepose_model(path), images, **kw)


# ---------------------------------------------------------------------------------------------- chart → canvas

def test_uv_pasted_at_the_box_with_the_argmax_part(one_person):
    res = run(one_person, frames(1))
    want_uv, want_labels = expected_a()
    assert res.uv.shape == (1, 2, H, W) and res.uv.dtype == torch.float32
    torch.testing.assert_close(res.uv[0], want_uv, rtol=0, atol=1e-6)
    assert torch.equal(res.labels[0], want_labels)
    assert res.people == [1]
    # background and the coarse-background half of the box are exactly 0
    assert (res.uv[0][:, want_labels == 0] == 0).all()
    # the distractor values of other parts never leak in
    assert not torch.isclose(res.uv, torch.tensor(DISTRACT)).any()


def test_largest_box_and_highest_score(two_people):
    largest = run(two_people, frames(1), person="largest")
    want_uv, want_labels = expected_b()
    torch.testing.assert_close(largest.uv[0], want_uv, rtol=0, atol=1e-6)
    assert torch.equal(largest.labels[0], want_labels) and largest.people == [2]
    # the tuple export has no scores: detections come best-first, so highest_score keeps the first (A)
    first = run(two_people, frames(1), person="highest_score")
    torch.testing.assert_close(first.uv[0], expected_a()[0], rtol=0, atol=1e-6)


def test_dict_export_with_scores(tmp_path):
    boxes = torch.tensor([BOX_A, BOX_B])
    path = save_script(FakeDictExport(torch.tensor([0.3, 0.9]), boxes, *stack(person_a(), person_b())),
                       tmp_path / "dict.pt")
    best = run(path, frames(1), person="highest_score")
    torch.testing.assert_close(best.uv[0], expected_b()[0], rtol=0, atol=1e-6)
    path2 = save_script(FakeDictExport(torch.tensor([0.9, 0.3]), boxes, *stack(person_a(), person_b())),
                        tmp_path / "dict2.pt")
    torch.testing.assert_close(run(path2, frames(1), person="highest_score").uv[0], expected_a()[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(run(path2, frames(1), person="largest").uv[0], expected_b()[0], rtol=0, atol=1e-6)


def test_no_person_gives_zeros(tmp_path):
    empty = FakeExport(torch.zeros(0, 4), torch.zeros(0, 2, S, S), torch.zeros(0, 25, S, S),
                       torch.zeros(0, 25, S, S), torch.zeros(0, 25, S, S))
    res = run(save_script(empty, tmp_path / "empty.torchscript"), frames(3))
    assert res.uv.shape == (3, 2, H, W) and not res.uv.any() and not res.labels.any()
    assert res.people == [0, 0, 0] and res.empty_frames == [0, 1, 2]


@pytest.mark.parametrize("box, x0, y0", [
    ([-3.5, -2.0, 4.5, 6.0], -3, -2),      # top-left outside: int() truncates toward 0 like detectron2
    ([26.2, 19.7, 34.5, 27.9], 26, 19),    # bottom-right overflow (the authors' script would crash here)
])
def test_box_partly_outside_is_clipped(tmp_path, box, x0, y0):
    path = save_script(FakeExport(torch.tensor([box]), *stack(person_a())), tmp_path / "edge.torchscript")
    res = run(path, frames(1))
    want_uv, want_labels = expected_a(x0, y0)
    assert want_labels.any()  # part of the body is visible
    torch.testing.assert_close(res.uv[0], want_uv, rtol=0, atol=1e-6)
    assert torch.equal(res.labels[0], want_labels)


def test_box_entirely_outside_gives_zeros(tmp_path):
    path = save_script(FakeExport(torch.tensor([[40.0, 30.0, 50.0, 40.0]]), *stack(person_a())),
                       tmp_path / "out.torchscript")
    res = run(path, frames(1))
    assert not res.uv.any() and res.people == [1]


def test_frames_reach_the_model_as_bgr_uint8(one_person):
    """Pixel (0,0) has blue k, red 50: fed BGR, the fake moves its box by k (by 50 if fed RGB)."""
    res = run(one_person, frames(3))
    for k in range(3):
        torch.testing.assert_close(res.uv[k], expected_a(10 + k)[0], rtol=0, atol=1e-6)
    rgb = run(one_person, frames(1), channel_order="rgb")  # controlnet_aux's order: box at x=60, off-frame
    assert not rgb.uv.any()
    # uint8 frames are taken as they are
    u8 = (frames(3) * 255).round().to(torch.uint8)
    assert torch.equal(run(one_person, u8).uv, res.uv)


def test_batching_equals_one_by_one(one_person):
    imgs = frames(5)
    calls = []
    batched = run(one_person, imgs, frames_per_batch=2, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    single = [run(one_person, imgs[i:i + 1]).uv[0] for i in range(5)]
    assert torch.equal(batched.uv, torch.stack(single))
    assert torch.equal(batched.uv, run(one_person, imgs, frames_per_batch=5).uv)


def test_detection_resolution_maps_boxes_back(tmp_path):
    """The model sees the frame resized ×2 (48×64); its boxes, in those pixels, come back in frame pixels."""
    path = save_script(FakeExport(torch.tensor([BOX_A]), *stack(person_a()), scale=2.0), tmp_path / "x2.torchscript")
    resized = run(path, frames(1, blue=0), detect_resolution=2 * H)
    torch.testing.assert_close(resized.uv[0], expected_a()[0], rtol=0, atol=1e-6)


def test_model_input_is_resized_bgr_uint8_padded_with_the_pixel_mean():
    frame = torch.zeros(H, W, 3, dtype=torch.uint8)
    frame[..., 0], frame[..., 2] = 200, 10                       # red 200, blue 10
    x = dp.model_input(frame, (48, 64))
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64)     # 48 rows padded to 64
    assert x[:, :48].flatten(1).unique(dim=1).tolist() == [[10], [0], [200]]  # B, G, R
    assert x[:, 48:].flatten(1).unique(dim=1).tolist() == [[104], [116], [124]]  # detectron2's BGR mean
    assert dp.model_input(frame, (H, W), "rgb")[:, :H, :W].flatten(1).unique(dim=1).tolist() == [[200], [0], [10]]


def test_detection_size_matches_detectron2_resize():
    assert dp.detection_size(720, 576) == (1000, 800)        # UBC frames: short side 576 → 800
    assert dp.detection_size(1080, 1920) == (750, 1333)      # long side capped at 1333
    assert dp.detection_size(64, 48, 0) == (64, 48)


def test_int_box_is_detectron2s_truncation():
    assert dp.int_box(torch.tensor([10.6, 5.2, 18.9, 13.9])) == (10, 5, 8, 8)
    assert dp.int_box(torch.tensor([-3.5, -2.0, 4.5, 6.0])) == (-3, -2, 8, 8)
    assert dp.int_box(torch.tensor([5.0, 5.0, 5.2, 5.9])) == (5, 5, 1, 1)  # at least one pixel


def test_bad_frames_and_options_fail_clearly(one_person):
    model = dp.load_densepose_model(one_person)
    with pytest.raises(DreamPoseError, match="alpha"):
        dp.estimate_uv(model, torch.zeros(1, H, W, 4))
    with pytest.raises(DreamPoseError, match="person"):
        dp.estimate_uv(model, frames(1), person="tallest")
    with pytest.raises(DreamPoseError, match="no frames"):
        dp.estimate_uv(model, torch.zeros(0, H, W, 3))


def test_visualisation_is_an_image_batch(one_person):
    res = run(one_person, frames(2))
    vis = dp.visualize(res.uv, res.labels)
    assert vis.shape == (2, H, W, 3) and vis.dtype == torch.float32
    assert vis.min() >= 0 and vis.max() <= 1
    torch.testing.assert_close(vis[0, 5, 14], torch.tensor([5 / 24, U5, V5]))
    torch.testing.assert_close(vis[0, 0, 0], torch.zeros(3))


# ---------------------------------------------------------------------------------------------- loading

def test_not_torchscript_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    evil = tmp_path / "evil.torchscript"
    torch.save({"x": Payload()}, str(evil))
    with pytest.raises(DreamPoseError, match="not a TorchScript"):
        dp.load_densepose_model(str(evil))
    plain = tmp_path / "plain.torchscript"
    plain.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(DreamPoseError, match="not a TorchScript"):
        dp.load_densepose_model(str(plain))
    assert not marker.exists()
    with pytest.raises(DreamPoseError, match="not found"):
        dp.load_densepose_model(str(tmp_path / "missing.torchscript"))


MAKE_NMS_MODEL = r"""
import sys, torch
lib = torch.library.Library("torchvision", "DEF")
lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
lib.impl("nms", lambda d, s, t: torch.arange(d.shape[0]), "CPU")
class M(torch.nn.Module):
    def forward(self, image: torch.Tensor):
        b = torch.zeros(1, 4)
        return torch.ops.torchvision.nms(b, torch.ones(1), 0.5)
torch.jit.save(torch.jit.script(M()), sys.argv[1])
"""


def test_missing_torchvision_ops_give_a_clear_error(tmp_path):
    """A graph that calls torchvision::nms (as the real exports do) cannot load without torchvision's ops."""
    import torchvision  # noqa: F401
    if hasattr(torch.ops.torchvision, "nms"):
        pytest.skip("torchvision's compiled ops load here; the error path cannot be shown")
    path, script = tmp_path / "nms.torchscript", tmp_path / "make_nms_model.py"
    script.write_text(MAKE_NMS_MODEL)  # TorchScript compiles from source files, not from -c
    subprocess.run([sys.executable, str(script), str(path)], check=True, timeout=120, capture_output=True)
    with pytest.raises(DreamPoseError, match=r"torchvision::nms.*torchvision build that matches your torch"):
        dp.load_densepose_model(str(path))


def test_a_graph_that_cannot_run_on_the_device_falls_back_to_the_cpu(one_person):
    """Traces may pin tensors to the CPU (or miss MPS kernels): the first failure moves the model back."""
    real = dp.load_densepose_model(one_person).module

    class PinnedToCpu:
        device = torch.device("cpu")

        def to(self, device):
            self.device = torch.device(device)
            return self

        def __call__(self, image):
            if self.device.type != "cpu" or image.device.type != "cpu":
                raise RuntimeError("Expected all tensors to be on the same device")
            return real(image)

    model = dp.DensePoseModel(PinnedToCpu()).to("meta")
    assert model.device.type == "meta"
    image = dp.model_input((frames(1)[0] * 255).round().to(torch.uint8), (H, W))
    det = model(image)
    assert model.device.type == "cpu" and len(det) == 1
    assert model.to("meta").device.type == "cpu"  # not tried again
    torch.testing.assert_close(det.boxes, torch.tensor([BOX_A]))


def test_output_layout_is_checked():
    with pytest.raises(DreamPoseError, match="expected \\(pred_boxes"):
        dp.parse_outputs((torch.zeros(1, 4),) * 3)
    with pytest.raises(DreamPoseError, match="unexpected shapes"):
        dp.parse_outputs((torch.zeros(1, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 25, 4, 4),
                          torch.zeros(2, 25, 4, 4), torch.zeros(1, 25, 4, 4)))


# ---------------------------------------------------------------------------------------------- files

def random_uv(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 25, (n, H, W), generator=g).to(torch.uint8)
    uv = torch.rand(n, 2, H, W, generator=g) * (labels > 0).unsqueeze(1)
    return uv, labels


def test_npy_round_trip_in_the_authors_layout(tmp_path):
    uv, _ = random_uv()
    folder = str(tmp_path / "poses")
    paths = save_uv_folder(folder, uv, start=0)
    assert [os.path.basename(p) for p in paths] == [f"frame_{i}_densepose.npy" for i in range(3)]
    arr = np.load(paths[1], allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (2, H, W)
    assert torch.equal(load_uv_folder(folder), uv)
    with pytest.raises(DreamPoseError, match="already holds 3"):
        save_uv_folder(folder, uv[:1])
    save_uv_folder(folder, uv[:2], start=7, overwrite=True)  # old frames removed, not mixed
    assert sorted(os.listdir(folder)) == ["frame_7_densepose.npy", "frame_8_densepose.npy"]


@pytest.mark.parametrize("order", ["iuv", "vui"])
def test_iuv_png_round_trip(tmp_path, order):
    uv, labels = random_uv()
    folder = str(tmp_path / "iuv")
    paths = dp.save_iuv_folder(folder, uv, labels, start=1, order=order)
    assert [os.path.basename(p) for p in paths] == [f"frame_{i}_iuv.png" for i in (1, 2, 3)]
    with Image.open(paths[0]) as im:
        assert im.mode == "RGB" and im.size == (W, H)
        pixels = np.asarray(im)
    index_channel = 0 if order == "iuv" else 2
    assert np.array_equal(pixels[..., index_channel], labels[0].numpy())  # documented channel layout
    for how in (order, "auto"):
        got_uv, got_labels = dp.load_iuv_folder(folder, order=how)
        assert torch.equal(got_labels, labels)
        assert (got_uv - uv).abs().max() <= 0.5 / 255 + 1e-7
        assert (got_uv * (labels == 0).unsqueeze(1)).abs().max() == 0
    part, _ = dp.load_iuv_folder(folder, start=1, count=1, order=order)
    assert part.shape == (1, 2, H, W)


def test_iuv_without_labels_marks_the_body_as_part_1(tmp_path):
    uv, labels = random_uv(1)
    folder = str(tmp_path / "iuv")
    dp.save_iuv_folder(folder, uv)
    got_uv, got_labels = dp.load_iuv_folder(folder)
    assert torch.equal(got_labels[0], ((uv[0] != 0).any(0)).to(torch.uint8))
    assert (got_uv - uv).abs().max() <= 0.5 / 255 + 1e-7


def test_coloured_visualisation_is_not_iuv(tmp_path):
    folder = tmp_path / "vis"
    folder.mkdir()
    Image.fromarray(np.full((H, W, 3), 200, np.uint8)).save(folder / "frame_0.png")
    with pytest.raises(DreamPoseError, match="not IUV"):
        dp.load_iuv_folder(str(folder))


def test_estimated_poses_feed_the_window_builder(one_person, tmp_path):
    """The estimate is what DensePoseWindow5 takes, and survives the authors' file format exactly."""
    res = run(one_person, frames(3))
    folder = str(tmp_path / "poses")
    save_uv_folder(folder, res.uv)
    assert torch.equal(load_uv_folder(folder), res.uv)
    windows = make_pose_windows(res.uv, height=64, width=64)
    assert windows.windows().shape == (3, 10, 8, 8)


@pytest.mark.parametrize("h, w", [(13, 9), (3, 5), (40, 31)])
def test_chart_to_box_equals_the_all_channels_definition(h, w):
    """Channel-by-channel (bounded memory) equals resizing every channel at once, argmax, gather."""
    g = torch.Generator().manual_seed(h * w)
    coarse, fine = torch.randn(2, 7, 7, generator=g), torch.randn(25, 7, 7, generator=g)
    u, v = torch.rand(25, 7, 7, generator=g), torch.rand(25, 7, 7, generator=g)
    labels, uv = dp.chart_to_box(coarse, fine, u, v, h, w)

    def up(x):
        return torch.nn.functional.interpolate(x[None], (h, w), mode="bilinear", align_corners=False)[0]
    want_labels = up(fine).argmax(0) * (up(coarse).argmax(0) > 0)
    want_uv = torch.stack([up(u).gather(0, want_labels[None])[0], up(v).gather(0, want_labels[None])[0]])
    want_uv = want_uv * (want_labels > 0)
    assert torch.equal(labels, want_labels)
    torch.testing.assert_close(uv, want_uv, rtol=0, atol=1e-6)  # 1-ulp: vectorised vs single-channel kernels


# ---------------------------------------------------------------------------------------------- in the real host

DP_INPUTS = {
    "DreamPoseDensePose": ["images", "model", "person", "frames_per_batch", "detect_resolution"],
    "DreamPoseSaveUV": ["uv", "folder", "format", "first_number", "overwrite"],
    "DreamPoseLoadIUV": ["folder", "start", "count", "channel_order"],
}
DP_OUTPUTS = {"DreamPoseDensePose": ["DREAMPOSE_POSE", "IMAGE"], "DreamPoseSaveUV": ["STRING"],
              "DreamPoseLoadIUV": ["DREAMPOSE_POSE", "IMAGE"]}
REL_BOX = [0.3, 0.2, 0.7, 0.9]
HOST_FRAMES, HOST_FPB, HOST_DETECT = 3, 2, 320


@dataclass
class DensePoseHost:
    env: object
    aux: object       # a fake comfyui_controlnet_aux pack folder
    ckpts: object     # its ckpts/LayerNorm/DensePose-TorchScript-with-hint-image

    def run(self, name: str, prompt: dict, *args: str):
        from host_helpers import COMFY_DIR, HOST
        out = self.env.root / f"out-{name}"
        out.mkdir()
        path = self.env.root / f"{name}.json"
        path.write_text(json.dumps(prompt))
        proc = subprocess.run(
            [sys.executable, str(HOST / "headless.py"), "--comfy", COMFY_DIR, "--nodes", str(self.env.pack),
             str(self.aux), "--extra-model-paths", str(self.env.yaml), "--input-dir", str(self.env.input),
             "--output-dir", str(out), "--prompt", str(path), "--execute", *args],
            capture_output=True, text=True, timeout=300, cwd=self.env.root)
        proc.out = out
        return proc


@pytest.fixture(scope="module")
def dp_host(tmp_path_factory) -> DensePoseHost:
    """host_helpers.Env (tiny DreamPose models, key frame) + a fake export in models/densepose (through
    extra_model_paths.yaml) + a comfyui_controlnet_aux folder that already downloaded one."""
    from host_helpers import COMFY_DIR, Env
    if COMFY_DIR is None:
        pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh (scripts/test.sh does)")
    root = tmp_path_factory.mktemp("dphost")
    env = Env(root)
    fake = FakeExport(torch.tensor([REL_BOX]), *stack(person_a()), relative=True, shift=False)
    (env.models / "densepose").mkdir()
    save_script(fake, env.models / "densepose" / "fake_densepose.torchscript")
    env.yaml.write_text(env.yaml.read_text() + "  densepose: densepose\n")
    aux = root / "aux" / "comfyui_controlnet_aux"
    ckpts = aux / "ckpts" / "LayerNorm" / "DensePose-TorchScript-with-hint-image"
    ckpts.mkdir(parents=True)
    (aux / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    save_script(fake, ckpts / "densepose_r50_fpn_dl.torchscript")
    return DensePoseHost(env, aux, ckpts)


@pytest.mark.host
def test_densepose_nodes_in_the_host(dp_host):
    """Frames → DreamPoseDensePose → DensePoseWindow5 → DualCFGSampler (tiny models), plus Save UV
    (npy and IUV) → Load IUV, in one ComfyUI 0.3.75 process; the saved UV equals a library run."""
    from host_helpers import log, node, object_info_checks
    env, ckpts = dp_host.env, dp_host.ckpts
    prompt = {
        "1": node("LoadDreamPose", dreampose_weights="tiny_dreampose.safetensors", base_model="none",
                  clip_vision="tiny-clip", vae="from weights or base", dtype="fp32", vae_dtype="fp32",
                  convention="auto", subject="none"),
        "2": node("LoadImage", image="key_frame.png"),
        "3": node("CLIPVAEAdapterEncode", model=["1", 0], image=["2", 0], conditioning_latent="mode", seed=0),
        "4": node("RepeatImageBatch", image=["2", 0], amount=HOST_FRAMES),
        "5": node("DreamPoseDensePose", images=["4", 0], model="fake_densepose.torchscript", person="largest",
                  frames_per_batch=HOST_FPB, detect_resolution=HOST_DETECT),
        "6": node("DensePoseWindow5", uv=["5", 0], width=64, height=128),
        "7": node("DualCFGSampler", model=["1", 0], cond=["3", 0], poses=["6", 0], s_image=2.0, s_pose=1.0, steps=1,
                  sampler="ddim", seed=1, frames_per_batch=4, start="official", stretch="none"),
        "8": node("SaveImage", images=["7", 0], filename_prefix="animate"),
        "9": node("SaveImage", images=["5", 1], filename_prefix="dpview"),
        "10": node("DreamPoseSaveUV", uv=["5", 0], folder="dp_npy", format="npy", first_number=0, overwrite=False),
        "11": node("DreamPoseSaveUV", uv=["5", 0], folder="dp_iuv", format="iuv_png", first_number=1,
                   overwrite=False),
        "12": node("DreamPoseLoadIUV", folder=["11", 0], start=0, count=0, channel_order="auto"),
        "13": node("SaveImage", images=["12", 1], filename_prefix="iuvview"),
    }
    oi_path, progress = env.root / "oi.json", env.root / "progress.json"
    proc = dp_host.run("main", prompt, "--object-info", str(oi_path), "--progress-log", str(progress))
    out = proc.out
    assert proc.returncode == 0, log(proc)

    oi = json.loads(oi_path.read_text())
    plain = {k: v for k, v in DP_INPUTS.items() if k != "DreamPoseSaveUV"}
    object_info_checks(oi, plain, DP_OUTPUTS)
    save = oi["DreamPoseSaveUV"]  # an output node: ComfyUI adds hidden prompt/extra_pnginfo inputs
    assert save["output_node"] and save["category"] == "DreamPose/poses" and save["description"].strip()
    assert save["input_order"]["required"] == DP_INPUTS["DreamPoseSaveUV"] and save["output"] == ["STRING"]
    assert all(spec[1]["tooltip"].strip() for spec in save["input"]["required"].values())
    assert all(t.strip() for t in save["output_tooltips"])
    models = oi["DreamPoseDensePose"]["input"]["required"]["model"][1]["options"]
    assert set(models) == {"fake_densepose.torchscript", "densepose_r50_fpn_dl.torchscript"}

    key = torch.from_numpy(np.asarray(Image.open(env.key_frame).convert("RGB")).copy())
    height, width = key.shape[:2]
    want = dp.estimate_uv(dp.load_densepose_model(str(ckpts / "densepose_r50_fpn_dl.torchscript")),
                          key[None].repeat(HOST_FRAMES, 1, 1, 1), detect_resolution=HOST_DETECT)
    assert want.uv.any()
    saved = load_uv_folder(str(out / "dp_npy"))
    assert sorted(os.listdir(out / "dp_npy")) == [f"frame_{i}_densepose.npy" for i in range(HOST_FRAMES)]
    assert saved.shape == (HOST_FRAMES, 2, height, width) and torch.equal(saved, want.uv)

    iuv_names = sorted(os.listdir(out / "dp_iuv"))
    assert iuv_names == [f"frame_{i}_iuv.png" for i in range(1, HOST_FRAMES + 1)]
    red = np.asarray(Image.open(out / "dp_iuv" / iuv_names[0]))[..., 0]
    assert np.array_equal(red, want.labels[0].numpy())  # the real part index travelled with the UV

    for prefix, size in (("animate", (64, 128)), ("dpview", (width, height)), ("iuvview", (width, height))):
        pngs = sorted(out.glob(f"{prefix}_*.png"))
        assert len(pngs) == HOST_FRAMES, prefix
        with Image.open(pngs[0]) as im:
            assert im.size == size, prefix
    events = [e for e in json.loads(progress.read_text()) if e["node"] == "5"]
    assert [(e["value"], e["max"]) for e in events] == [(2, 3), (3, 3)]  # one tick per batch of frames


@pytest.mark.host
def test_densepose_cancel_and_bad_save_folder(dp_host):
    """Cancel stops after the current batch of frames; a save folder outside output/ is refused."""
    from host_helpers import log, node
    prompt = {
        "2": node("LoadImage", image="key_frame.png"),
        "4": node("RepeatImageBatch", image=["2", 0], amount=4),
        "5": node("DreamPoseDensePose", images=["4", 0], model="densepose_r50_fpn_dl.torchscript",
                  person="highest_score", frames_per_batch=1, detect_resolution=0),
        "9": node("SaveImage", images=["5", 1], filename_prefix="dpview"),
    }
    progress = dp_host.env.root / "cancel.json"
    proc = dp_host.run("cancel", prompt, "--progress-log", str(progress), "--interrupt-after", "1")
    assert proc.returncode == 1 and "INTERRUPTED at node 5" in proc.stderr, log(proc)
    assert [(e["value"], e["max"]) for e in json.loads(progress.read_text())] == [(1, 4)]
    assert not list(proc.out.glob("dpview_*"))

    prompt["10"] = node("DreamPoseSaveUV", uv=["5", 0], folder="../escaped", format="npy", first_number=0,
                        overwrite=False)
    del prompt["9"]
    proc = dp_host.run("escape", prompt)
    assert proc.returncode == 2 and "outside ComfyUI's output directory" in proc.stderr, log(proc)  # queue time
    assert not (dp_host.env.root / "escaped").exists()
