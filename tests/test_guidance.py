"""Fewer UNet evaluations per frame, exactly: zero-weight guidance branches left out, and guidance limited
to an interval of the schedule (Kynkäänniemi et al. 2024), on tiny real-architecture models."""
import pytest
import torch

from dreampose.demo.tiny import tiny_dreampose
from dreampose.errors import DreamPoseError
from dreampose.pipeline.conditioning import encode_image_condition
from dreampose.pipeline.guidance import DualCFGDenoiser, branch_weights, guided_at
from dreampose.pipeline.poses import make_pose_windows
from dreampose.pipeline.sampling import SampleStats, make_scheduler, sample
from dreampose.settings import SamplingOptions

N = 2


@pytest.fixture(scope="module")
def parts():
    model = tiny_dreampose(seed=5)
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(N, 4, 16, 16, generator=g)
    pose = torch.randn(N, 10, 16, 16, generator=g)
    cond, uncond = torch.randn(1, 50, 32, generator=g), torch.randn(1, 50, 32, generator=g)
    t = torch.tensor(321)
    zero = torch.zeros_like(pose)
    with torch.no_grad():
        eps = {name: model.unet(torch.cat([latents, p], 1), t, encoder_hidden_states=h.expand(N, -1, -1)).sample
               for name, p, h in (("null", zero, uncond), ("image", zero, cond), ("full", pose, cond))}
    return model, latents, pose, cond, uncond, t, eps


def test_guided_at_reads_fractions_as_comfyui_percents():
    # fraction p is timestep (1 - p) * 999: 0 … 0.5 guides timesteps 499.5 … 999
    assert guided_at(999, 0.0, 0.5) and guided_at(500, 0.0, 0.5) and not guided_at(499, 0.0, 0.5)
    assert guided_at(0, 0.3, 1.0) and guided_at(699, 0.3, 1.0) and not guided_at(700, 0.3, 1.0)
    assert all(guided_at(t, 0.0, 1.0) for t in (0, 1, 500, 998, 999))
    assert guided_at(torch.tensor(400), 0.2, 0.8) and not guided_at(torch.tensor(150), 0.2, 0.8)


@pytest.mark.parametrize("s_image, s_pose, branches", [(7.5, 2.5, 3), (3.0, 3.0, 2), (1.0, 2.0, 2), (1.0, 1.0, 1),
                                                       (4.0, 0.0, 2)])
def test_zero_weight_branches_are_left_out_and_eq4_still_holds(parts, s_image, s_pose, branches):
    model, latents, pose, cond, uncond, t, eps = parts
    den = DualCFGDenoiser(model.unet, cond, uncond, pose, s_image, s_pose)
    with torch.no_grad():
        got = den(latents, t)
    want = eps["null"] + s_image * (eps["image"] - eps["null"]) + s_pose * (eps["full"] - eps["image"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(den.branches) == branches and den.evaluations == branches * N and den.calls == 1
    w_null, w_full, w_image = branch_weights(s_image, s_pose)
    assert (w_null, w_full, w_image) == (1 - s_image, s_pose, s_image - s_pose)


def test_outside_the_interval_only_the_image_and_pose_branch_runs(parts):
    model, latents, pose, cond, uncond, t, eps = parts          # t = 321 is fraction 0.68 of the schedule
    den = DualCFGDenoiser(model.unet, cond, uncond, pose, 7.5, 2.5, interval=(0.0, 0.5))
    with torch.no_grad():
        got = den(latents, t)
    torch.testing.assert_close(got, eps["full"], atol=1e-5, rtol=1e-5)
    assert den.evaluations == N
    inside = DualCFGDenoiser(model.unet, cond, uncond, pose, 7.5, 2.5, interval=(0.5, 1.0))
    with torch.no_grad():
        got = inside(latents, t)
    want = eps["null"] + 7.5 * (eps["image"] - eps["null"]) + 2.5 * (eps["full"] - eps["image"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert inside.evaluations == 3 * N


def _run(model, cond, poses, **options):
    stats = SampleStats()
    opts = SamplingOptions(width=128, height=128, steps=6, sampler="ddim", s_image=5.0, s_pose=2.0,
                           frames_per_batch=2, **options)
    out = sample(model, cond, poses, opts, generator=torch.Generator().manual_seed(3), stats=stats)
    return out, stats


def test_the_whole_interval_is_todays_run_bit_for_bit_and_a_part_of_it_counts_its_evaluations():
    model = tiny_dreampose(seed=2)
    cond = encode_image_condition(model, torch.rand(3, 640, 512), convention="official",
                                  generator=torch.Generator().manual_seed(0))
    poses = make_pose_windows(torch.rand(3, 2, 64, 64), 128, 128)
    plain, plain_stats = _run(model, cond, poses)
    whole, _ = _run(model, cond, poses, guidance_start=0.0, guidance_end=1.0)
    assert torch.equal(plain, whole)
    assert plain_stats.image_evaluations == 6 * 3 * 3      # 6 steps × 3 frames × 3 branches
    part, stats = _run(model, cond, poses, guidance_start=0.2, guidance_end=0.7)
    sched = make_scheduler("ddim")
    sched.set_timesteps(6)
    guided = sum(0.3 * 999 <= t <= 0.8 * 999 for t in sched.timesteps.tolist())
    assert 0 < guided < 6
    assert stats.image_evaluations == 3 * (3 * guided + (6 - guided))
    assert (part - plain).abs().max() > 1e-3               # fewer guided steps: other frames


@pytest.mark.parametrize("start, end, message", [
    (0.7, 0.2, "guidance_start (0.7) is after guidance_end (0.2)"),
    (-0.1, 1.0, "guidance_start must be a fraction of the schedule from 0 to 1, got -0.1"),
    (0.0, 1.5, "guidance_end must be a fraction of the schedule from 0 to 1, got 1.5"),
])
def test_a_bad_guidance_interval_is_refused_with_what_to_do(start, end, message):
    with pytest.raises(DreamPoseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingOptions(guidance_start=start, guidance_end=end).check()
