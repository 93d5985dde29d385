"""Evaluation metrics (dreampose.evaluation.metrics) against hand computations and closed forms.

Feature metrics are exercised with torchvision's real architectures holding seeded random weights
(saved to files, loaded through the real loaders): what is checked is the plumbing and the
definitions (identical inputs → 0, different → > 0, one LPIPS layer recomputed by hand), never the
pretrained values, which cannot be had offline.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from dreampose.evaluation import metrics as M
from dreampose.errors import DreamPoseError

tv = pytest.importorskip("torchvision")


def rand_frames(n=3, h=16, w=16, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- pixels

def test_l1_by_hand():
    pred = torch.zeros(2, 3, 4, 4)
    gt = torch.full((2, 3, 4, 4), 0.5)
    gt[1, 0] = 0.0   # frame 1: one channel of three agrees
    assert M.l1(pred, gt).tolist() == pytest.approx([0.5, 1 / 3])


def test_ssim_identical_is_one():
    x = rand_frames(2, 20, 24)
    assert torch.allclose(M.ssim(x, x.clone()), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_ssim_constant_images_closed_form():
    a, b = 0.2, 0.6
    c1 = (0.01 * 1) ** 2
    pred, gt = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    # σ = 0 everywhere: SSIM = (2ab + C1)/(a² + b² + C1) · C2/C2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    assert M.ssim(pred, gt).item() == pytest.approx(want, rel=1e-6)


def test_gaussian_window():
    g = M.gaussian_window()
    assert g.shape == (11,) and g.sum().item() == pytest.approx(1.0)
    assert torch.equal(g, g.flip(0)) and g.argmax().item() == 5
    assert (g[0] / g[5]).item() == pytest.approx(math.exp(-25 / (2 * 1.5 ** 2)))


def _ssim_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Independent SSIM of one channel: explicit window sums over every valid 11×11 position."""
    g = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("h,w", [(11, 11), (13, 12)])
def test_ssim_against_loops(h, w):
    pred, gt = rand_frames(2, h, w, seed=1), rand_frames(2, h, w, seed=2)
    gt[1] = (pred[1] * 0.7 + 0.1)   # a correlated pair too
    got = M.ssim(pred, gt)
    for f in range(2):
        want = np.mean([_ssim_by_loops(pred[f, c].double().numpy(), gt[f, c].double().numpy()) for c in range(3)])
        assert got[f].item() == pytest.approx(want, abs=1e-10)


def test_pixel_metrics_refuse_bad_shapes():
    with pytest.raises(DreamPoseError, match="differ in shape"):
        M.l1(rand_frames(2), rand_frames(3))
    with pytest.raises(DreamPoseError, match=r"\[F,3,H,W\]"):
        M.ssim(torch.rand(3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(DreamPoseError, match="at least 11x11"):
        M.ssim(rand_frames(1, 8, 8), rand_frames(1, 8, 8))


# --------------------------------------------------------------------------------------------- masks

def test_mask_iou_by_hand_and_empty():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = torch.zeros(3, 4, 4, dtype=torch.bool)
    a[0, :2] = True          # 8 pixels
    b[0, 1:3] = True         # 8 pixels, 4 shared → 4/12
    b[1, 0, 0] = True        # empty vs one pixel → 0
    # frame 2: empty ∪ empty → 1
    assert M.mask_iou(a, b).tolist() == pytest.approx([1 / 3, 0.0, 1.0])


@pytest.mark.parametrize("n", range(2, 9))
def test_derangement_moves_every_frame(n):
    for seed in range(5):
        perm = M.derangement(n, seed)
        assert sorted(perm) == list(range(n))
        assert all(p != i for i, p in enumerate(perm))
        assert perm == M.derangement(n, seed)
    with pytest.raises(DreamPoseError, match="at least 2"):
        M.derangement(1)


def test_pose_alignment_true_vs_shuffled():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    for i in range(4):
        masks[i, :, 2 * i:2 * i + 2] = True   # disjoint bands: any other frame's pose has IoU 0
    out = M.pose_alignment(masks, masks.clone(), shuffle_seed=3)
    assert out["iou"] == 1.0 and out["shuffled_iou"] == 0.0
    assert all(p != i for i, p in enumerate(out["permutation"]))
    ignoring = masks[:1].expand(4, -1, -1)    # a "model" that draws frame 0's pose every time
    out = M.pose_alignment(ignoring, masks, shuffle_seed=3)
    assert out["iou"] == pytest.approx(0.25)
    single = M.pose_alignment(masks[:1], masks[:1])
    assert single["iou"] == 1.0 and single["shuffled_iou"] is None


def test_flicker_by_hand():
    levels_pred, levels_gt = (0.0, 0.1, 0.3), (0.0, 0.2, 0.4)
    pred = torch.stack([torch.full((3, 4, 4), v) for v in levels_pred])
    gt = torch.stack([torch.full((3, 4, 4), v) for v in levels_gt])
    out = M.flicker(pred, gt)
    assert out["generated"] == pytest.approx(0.15) and out["ground_truth"] == pytest.approx(0.2)
    assert out["ratio"] == pytest.approx(0.75) and out["pairs"] == 2
    only_second = M.flicker(pred, gt, pairs=[1])
    assert only_second["ratio"] == pytest.approx(1.0)
    still = M.flicker(pred, torch.zeros_like(gt))
    assert still["ratio"] is None and still["generated"] == pytest.approx(0.15)


# --------------------------------------------------------------------------------------------- Fréchet

def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_closed_form(method):
    if method == "sqrtm":
        pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method) == pytest.approx(want, rel=1e-9)
    r = _rotation(d, 1)   # same closed form for covariances sharing eigenvectors, in a rotated basis
    got = M.frechet_distance(mu1, r @ np.diag(a) @ r.T, mu2, r @ np.diag(b) @ r.T, method)
    assert got == pytest.approx(want, rel=1e-7)
    assert M.frechet_distance(mu1, np.diag(a), mu1, np.diag(a), method) == pytest.approx(0, abs=1e-9)


def test_frechet_from_features_low_rank_route_is_exact():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 40)), rng.normal(1.0, 2.0, size=(9, 40))   # 16 samples < 40 dims
    want = M.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), "eigh")
    # the D×D route carries √(rounding noise) from the 24 numerically-zero eigenvalues: ~1e-8 relative
    assert M.frechet_distance_from_features(a, b) == pytest.approx(want, rel=1e-7)
    assert M.frechet_distance_from_features(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0, abs=1e-9)
    big_a, big_b = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(25, 5))   # covariance route
    want = M.frechet_distance(big_a.mean(0), np.cov(big_a, rowvar=False), big_b.mean(0),
                              np.cov(big_b, rowvar=False), "eigh")
    assert M.frechet_distance_from_features(big_a, big_b) == pytest.approx(want, rel=1e-6)
    with pytest.raises(DreamPoseError, match="at least 2 samples"):
        M.frechet_distance_from_features(a[:1], b)


# --------------------------------------------------------------------------------------------- feature nets

@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """torchvision's VGG16 ``features`` with seeded random weights, saved as a VGG16 state dict
    (``features.*``; the classifier, unused by the metrics, is left out to keep the file small)."""
    from torchvision.models import vgg as tv_vgg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = tv_vgg.make_layers(tv_vgg.cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    state = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(M.LPIPS_CHANNELS)}
    path = tmp_path_factory.mktemp("lpips") / "vgg.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = tv.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "inception_v3_google-0cc3c7bd.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def test_vgg_distance(vgg16_file):
    net = M.load_vgg(vgg16_file)
    assert net.arch == "vgg16" and net.taps == (3, 8, 15, 22, 29)
    x, y = rand_frames(2, 32, 32, 1), rand_frames(2, 32, 32, 2)
    assert M.vgg_distance(x, x.clone(), net).tolist() == [0.0, 0.0]
    d = M.vgg_distance(x, y, net)
    assert (d > 0).all()
    assert torch.allclose(d, M.vgg_distance(y, x, net))


def test_lpips_identical_zero_and_one_layer_by_hand(vgg16_file, lpips_file, tmp_path):
    vgg = M.load_vgg(vgg16_file)
    net = M.load_lpips(lpips_file, vgg)
    x, y = rand_frames(2, 32, 32, 3), rand_frames(2, 32, 32, 4)
    assert M.lpips_distance(x, x.clone(), net).abs().max().item() < 1e-6
    assert (M.lpips_distance(x, y, net) > 0).all()
    # only lin0 = 1: LPIPS = spatial mean of Σ_c (unit-normalised relu1_2 difference)²
    only0 = {f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 1.0 if k == 0 else 0.0)
             for k, c in enumerate(M.LPIPS_CHANNELS)}
    torch.save(only0, tmp_path / "only0.pth")
    net0 = M.load_lpips(str(tmp_path / "only0.pth"), vgg)
    shift = torch.tensor(M.LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(M.LPIPS_SCALE).view(1, 3, 1, 1)
    with torch.no_grad():
        fx = vgg.features[:4]((x * 2 - 1 - shift) / scale)
        fy = vgg.features[:4]((y * 2 - 1 - shift) / scale)
    nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
    ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
    want = (nx - ny).pow(2).sum(1).mean(dim=(1, 2))
    assert torch.allclose(M.lpips_distance(x, y, net0).float(), want, rtol=1e-4)


def test_wrong_weight_files(vgg16_file, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(DreamPoseError, match="not a readable weights file"):
        M.load_vgg(str(garbage))
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(DreamPoseError, match="not a torchvision VGG16/VGG19"):
        M.load_vgg(str(other))
    with pytest.raises(DreamPoseError, match="not an LPIPS v0.1"):
        M.load_lpips(str(other), M.load_vgg(vgg16_file))
    with pytest.raises(DreamPoseError, match="not a torchvision inception_v3"):
        M.load_inception(vgg16_file)
    with pytest.raises(DreamPoseError, match="--vgg-weights: not found"):
        M.load_feature_nets(vgg=str(tmp_path / "missing.pth"), discover=False)


def test_missing_weights_are_skipped_with_the_reason(empty_torch_home):
    nets = M.load_feature_nets(discover=True)
    status = nets.status()
    assert status["vgg"].startswith("vgg: skipped — no VGG16/19 weights found (give --vgg-weights FILE")
    assert status["lpips"] == "lpips: skipped — no LPIPS weights found (give --lpips-weights FILE)"
    assert status["fid"].startswith("fid: skipped — no Inception v3 weights found (give --inception-weights FILE")
    assert status["fvd"].startswith("fvd: skipped — no I3D TorchScript given (give --i3d-weights FILE")
    assert nets.vgg is nets.lpips is nets.inception is nets.i3d is None


def test_lpips_needs_vgg16_backbone(lpips_file, empty_torch_home):
    nets = M.load_feature_nets(lpips=lpips_file)
    assert nets.lpips is None and "needs VGG16 backbone" in nets.status()["lpips"]


def test_discovery_in_torch_home(vgg16_file, lpips_file, empty_torch_home):
    folder = empty_torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    os.symlink(vgg16_file, folder / "vgg16-397923af.pth")
    nets = M.load_feature_nets(lpips=lpips_file)
    assert nets.files["vgg"] == str(folder / "vgg16-397923af.pth")
    assert nets.lpips is not None and nets.lpips.vgg is nets.vgg
    assert M.load_feature_nets(discover=False).vgg is None


def test_without_torchvision(monkeypatch, vgg16_file):
    monkeypatch.setattr(M, "_torchvision", lambda: None)
    nets = M.load_feature_nets(vgg=vgg16_file, discover=False)
    for metric in ("vgg", "lpips", "fid"):
        assert nets.status()[metric] == f"{metric}: skipped — torchvision not installed (pip install torchvision)"


def test_fid_with_random_inception(inception_file):
    net = M.load_inception(inception_file)
    x, y = rand_frames(3, 32, 32, 5), rand_frames(3, 32, 32, 6) * 0.5
    fx, fy = M.inception_features(x, net), M.inception_features(y, net)
    assert fx.shape == (3, 2048)
    assert M.frechet_distance_from_features(fx, M.inception_features(x.clone(), net)) == pytest.approx(0, abs=1e-6)
    assert M.frechet_distance_from_features(fx, fy) > 0


class _FakeI3D(torch.nn.Module):
    """Stands in for an I3D TorchScript: the documented call signature, [N,6] features."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)


class _WrongSignature(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit.script/save in the test itself
def test_fvd_plumbing(tmp_path):
    path = str(tmp_path / "i3d.pt")
    torch.jit.save(torch.jit.script(_FakeI3D()), path)
    net = M.load_i3d(path)
    frames = rand_frames(35, 40, 30, 7)
    clips = M.i3d_clips(frames)
    assert clips.shape == (2, 3, 16, 224, 224)             # 35 frames → two whole 16-frame clips
    assert clips.min() >= -1 and clips.max() <= 1
    feats = M.i3d_features(clips, net)
    assert feats.shape == (2, 6)
    assert M.i3d_clips(frames[:15]).shape[0] == 0
    wrong = str(tmp_path / "wrong.pt")
    torch.jit.save(torch.jit.script(_WrongSignature()), wrong)
    with pytest.raises(DreamPoseError, match="does not accept net"):
        M.i3d_features(clips, M.load_i3d(wrong))
    not_script = tmp_path / "not_script.pt"
    not_script.write_bytes(b"plain bytes")
    with pytest.raises(DreamPoseError, match="not a TorchScript file"):
        M.load_i3d(str(not_script))
