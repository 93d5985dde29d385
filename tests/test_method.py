"""The method's invariants, checked against hand-derived math on tiny real-architecture models."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreampose.models.adapter import EmbeddingAdapter
from dreampose.pipeline.conditioning import encode_image_condition
from dreampose.errors import DreamPoseError
from dreampose.pipeline.guidance import DualCFGDenoiser, dual_cfg
from dreampose.pipeline.images import clip_pixels, resize_u8
from dreampose.pipeline.poses import make_pose_windows, window_indices
from dreampose.pipeline.sampling import SampleStats, make_scheduler, sample
from dreampose.settings import SamplingOptions
from dreampose.demo.tiny import tiny_base_unet, tiny_dreampose
from dreampose.models.unet import expand_conv_in


def _unet_inputs(batch=2, h=16, w=16, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, h, w, generator=g), torch.randn(batch, 10, h, w, generator=g),
            torch.randn(batch, 50, width, generator=g))


def test_fresh_dreampose_unet_equals_base_whatever_the_pose():
    base = tiny_base_unet(seed=11)
    unet = expand_conv_in(base)
    assert unet.conv_in.weight.shape[1] == 14 and unet.config.in_channels == 14
    assert torch.equal(unet.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.equal(unet.conv_in.bias, base.conv_in.bias)  # pretrained bias kept (official dropped it)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    latents, pose, hidden = _unet_inputs()
    t = torch.tensor(500)
    with torch.no_grad():
        want = base(latents, t, encoder_hidden_states=hidden).sample
        got_a = unet(torch.cat([latents, pose], 1), t, encoder_hidden_states=hidden).sample
        got_b = unet(torch.cat([latents, 5 * pose.flip(0)], 1), t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(got_a, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_b, want, atol=1e-5, rtol=1e-5)


def test_expand_refuses_an_already_expanded_unet():
    with pytest.raises(ValueError, match="4 input channels"):
        expand_conv_in(expand_conv_in(tiny_base_unet()))


def test_adapter_has_official_shapes_and_keys():
    ad = EmbeddingAdapter()
    shapes = {k: tuple(v.shape) for k, v in ad.state_dict().items()}
    assert shapes == {"vae2clip.weight": (768, 1280), "vae2clip.bias": (768,),
                      "linear1.weight": (50, 54), "linear1.bias": (50,)}
    assert torch.equal(ad.linear1.weight, torch.eye(50, 54))


def test_fresh_adapter_ignores_vae_tokens_and_passes_clip_through():
    torch.manual_seed(0)
    ad = EmbeddingAdapter(clip_width=32)
    clip = torch.randn(2, 50, 32)
    with torch.no_grad():
        a = ad(clip, torch.randn(2, 4, 80, 64))
        b = ad(clip, 100 * torch.randn(2, 4, 80, 64))
    torch.testing.assert_close(a, b)
    # token mixing by eye(50,54) + bias: output token t = clip token t + bias[t]
    torch.testing.assert_close(a, clip + ad.linear1.bias.view(1, 50, 1))


def test_adapter_token_order_matches_rearrange_by_hand():
    torch.manual_seed(1)
    ad = EmbeddingAdapter(clip_width=8)
    clip, vae = torch.randn(1, 50, 8), torch.randn(1, 4, 80, 64)
    with torch.no_grad():
        ad.linear1.weight.normal_()
        pooled = F.max_pool2d(vae, 2).reshape(1, 4, 40 * 32)      # row-major over h then w
        tokens = torch.cat([clip, pooled @ ad.vae2clip.weight.T + ad.vae2clip.bias], 1)   # [1,54,8]
        want = (tokens.transpose(1, 2) @ ad.linear1.weight.T + ad.linear1.bias).transpose(1, 2)
        torch.testing.assert_close(ad(clip, vae), want, atol=1e-5, rtol=1e-5)


def test_adapter_rejects_wrong_conditioning_size():
    with pytest.raises(ValueError, match="640×512"):
        EmbeddingAdapter(clip_width=8)(torch.zeros(1, 50, 8), torch.zeros(1, 4, 64, 64))


def test_window_indices_use_centre_pose_at_edges():
    idx = window_indices(5)
    assert idx.tolist() == [[0, 0, 0, 1, 2], [1, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4, 3], [2, 3, 4, 4, 4]]
    assert window_indices(1).tolist() == [[0, 0, 0, 0, 0]]


def test_pose_windows_equal_official_per_frame_construction():
    """Official: each pose bilinear to 640×512, (x-.5)/.5, cat 5 → nearest to latent size."""
    g = torch.Generator().manual_seed(3)
    uv = torch.rand(4, 2, 100, 70, generator=g)
    pw = make_pose_windows(uv, 640, 512)
    for i in range(4):
        parts = []
        for k in range(i - 2, i + 3):
            src = uv[k] if 0 <= k < 4 else uv[i]
            full = F.interpolate(src[None], (640, 512), mode="bilinear")[0]
            parts.append((full - 0.5) / 0.5)
        want = F.interpolate(torch.cat(parts)[None], (80, 64))[0]
        torch.testing.assert_close(pw.windows([i])[0], want, atol=1e-6, rtol=0)
    assert pw.windows().shape == (4, 10, 80, 64)


def test_pose_windows_reject_bad_input():
    with pytest.raises(DreamPoseError, match="multiple of 64"):
        make_pose_windows(torch.rand(2, 2, 64, 64), 640, 500)
    with pytest.raises(DreamPoseError, match="empty"):
        make_pose_windows(torch.rand(0, 2, 64, 64))
    with pytest.raises(DreamPoseError, match="IUV"):
        make_pose_windows(torch.rand(3, 3, 64, 64))


def test_dual_cfg_formula_by_hand():
    u, i, f = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([4.0])
    # 1 + 8·(3−1) + 3·(4−3) = 20
    assert dual_cfg(u, i, f, 8.0, 3.0).item() == 20.0
    # s_I = s_p = 1 gives the fully conditioned prediction
    assert dual_cfg(u, i, f, 1.0, 1.0).item() == 4.0


def test_batched_dual_cfg_equals_three_separate_calls():
    model = tiny_dreampose(seed=5)
    unet = model.unet
    n = 3
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(n, 4, 16, 16, generator=g)
    pose = torch.randn(n, 10, 16, 16, generator=g)
    cond, uncond = torch.randn(1, 50, 32, generator=g), torch.randn(1, 50, 32, generator=g)
    t = torch.tensor(321)
    den = DualCFGDenoiser(unet, cond, uncond, pose, s_image=7.5, s_pose=2.5)
    with torch.no_grad():
        got = den(latents, t)
        zero = torch.zeros_like(pose)
        e_u = unet(torch.cat([latents, zero], 1), t, encoder_hidden_states=uncond.expand(n, -1, -1)).sample
        e_i = unet(torch.cat([latents, zero], 1), t, encoder_hidden_states=cond.expand(n, -1, -1)).sample
        e_f = unet(torch.cat([latents, pose], 1), t, encoder_hidden_states=cond.expand(n, -1, -1)).sample
    want = e_u + 7.5 * (e_i - e_u) + 2.5 * (e_f - e_i)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert den.calls == 1
    assert not torch.allclose(e_f, e_i)  # the pose really reaches the tiny model


def test_sampler_makes_one_unet_call_per_timestep_per_chunk():
    model = tiny_dreampose(seed=2)
    cond = encode_image_condition(model, torch.rand(3, 640, 512), convention="official",
                                  generator=torch.Generator().manual_seed(0))
    poses = make_pose_windows(torch.rand(5, 2, 64, 64), 128, 128)
    stats = SampleStats()
    out = sample(model, cond, poses, SamplingOptions(width=128, height=128, steps=4, frames_per_batch=2),
                 generator=torch.Generator().manual_seed(0), stats=stats)
    sched = make_scheduler("pndm")
    sched.set_timesteps(4)
    assert out.shape == (5, 4, 16, 16)
    assert stats.unet_calls == len(sched.timesteps) * 3  # 3 chunks: 2+2+1 frames
    assert stats.unet_batch == 6


def test_frame_chunking_does_not_change_deterministic_results():
    model = tiny_dreampose(seed=4)
    cond = encode_image_condition(model, torch.rand(3, 640, 512), convention="official",
                                  generator=torch.Generator().manual_seed(0))
    poses = make_pose_windows(torch.rand(4, 2, 64, 64), 128, 128)
    runs = [sample(model, cond, poses, SamplingOptions(width=128, height=128, steps=3, sampler="ddim",
                                                       frames_per_batch=k),
                   generator=torch.Generator().manual_seed(9)) for k in (1, 4)]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "dpmpp_2m", "euler_a", "unipc"])
def test_every_sampler_is_seeded_and_reproducible(sampler):
    model = tiny_dreampose(seed=1)
    cond = encode_image_condition(model, torch.rand(3, 640, 512), convention="official",
                                  generator=torch.Generator().manual_seed(0))
    poses = make_pose_windows(torch.rand(2, 2, 64, 64), 64, 128)
    options = SamplingOptions(width=128, height=64, steps=3, sampler=sampler)
    run = lambda seed: sample(model, cond, poses, options, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert a.shape == (2, 4, 8, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_pose_changes_the_frame():
    model = tiny_dreampose(seed=6)
    cond = encode_image_condition(model, torch.rand(3, 640, 512), convention="official",
                                  generator=torch.Generator().manual_seed(0))
    uv = torch.zeros(2, 2, 64, 64)
    uv[1, :, 10:50, 20:40] = 0.7
    poses = make_pose_windows(uv, 64, 64)
    out = sample(model, cond, poses, SamplingOptions(width=64, height=64, steps=3), latents=torch.zeros(1, 4, 8, 8))
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_official_start_latent_is_key_frame_noised_to_first_timestep():
    """x_T = √ᾱ·0.18215·VAE([-1,1] key).sample + √(1−ᾱ)·ε at the first timestep, ε shared by all frames."""
    from dreampose.pipeline.sampling import start_latents
    model = tiny_dreampose(seed=3)
    key = torch.rand(3, 640, 512)
    cond = encode_image_condition(model, key, convention="official", latent_mode="mode")
    sched = make_scheduler("pndm")
    sched.set_timesteps(100)
    assert sched.timesteps[0].item() == 991
    x = start_latents(model, cond, sched, SamplingOptions(start="official"), 3,
                      generator=torch.Generator().manual_seed(5), device="cpu")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        pixels = cond.key_frame.float() / 255 * 2 - 1
        z = model.vae.encode(pixels).latent_dist.sample(generator=g) * 0.18215
    eps = torch.randn(1, 4, 80, 64, generator=g)
    abar = sched.alphas_cumprod[991]
    want = abar.sqrt() * z + (1 - abar).sqrt() * eps
    assert x.shape == (3, 4, 80, 64)
    torch.testing.assert_close(x, want.expand(3, -1, -1, -1), atol=1e-5, rtol=1e-5)


def test_clip_preprocessing_matches_the_pil_clip_processor():
    transformers = pytest.importorskip("transformers")
    from PIL import Image
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: the PIL-based processor is the default one
        Processor = transformers.CLIPImageProcessor
    arr = (np.random.RandomState(0).rand(640, 512, 3) * 255).astype(np.uint8)
    want = Processor()(images=Image.fromarray(arr), return_tensors="pt").pixel_values
    got = clip_pixels(torch.from_numpy(arr).permute(2, 0, 1)[None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_key_frame_resize_is_pil_bicubic():
    from PIL import Image
    arr = (np.random.RandomState(1).rand(300, 200, 3) * 255).astype(np.uint8)
    want = np.asarray(Image.fromarray(arr).resize((512, 640), Image.BICUBIC))
    got = resize_u8(torch.from_numpy(arr).permute(2, 0, 1)[None], 640, 512)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("convention", ["official", "standard"])
def test_conditioning_latent_mode_is_deterministic_and_sample_is_seeded(convention):
    model = tiny_dreampose(seed=8)
    img = torch.rand(3, 640, 512)
    enc = lambda **kw: encode_image_condition(model, img, convention=convention, **kw)  # noqa: E731
    m1, m2 = enc(latent_mode="mode"), enc(latent_mode="mode")
    assert torch.equal(m1.cond, m2.cond) and torch.equal(m1.uncond, m2.uncond)
    s1 = enc(generator=torch.Generator().manual_seed(1))
    s2 = enc(generator=torch.Generator().manual_seed(1))
    s3 = enc(generator=torch.Generator().manual_seed(2))
    assert torch.equal(s1.cond, s2.cond) and not torch.equal(s1.cond, s3.cond)
    assert m1.cond.shape == (1, 50, 32)


def test_conventions_differ_in_the_vae_path_only():
    model = tiny_dreampose(seed=9)
    img = torch.rand(3, 640, 512)
    off = encode_image_condition(model, img, convention="official", latent_mode="mode")
    std = encode_image_condition(model, img, convention="standard", latent_mode="mode")
    assert not torch.allclose(off.cond, std.cond)
    # with the VAE tokens switched off in the adapter, only CLIP remains: identical
    fresh = tiny_dreampose(seed=9, pose_sensitive=False)
    a = encode_image_condition(fresh, img, convention="official", latent_mode="mode")
    b = encode_image_condition(fresh, img, convention="standard", latent_mode="mode")
    torch.testing.assert_close(a.cond, b.cond)


def test_bad_image_input_is_refused_before_encoding():
    model = tiny_dreampose()
    for img, msg in [(torch.rand(4, 64, 64), "RGBA"), (torch.rand(1, 64, 64), "greyscale"),
                     (torch.rand(2, 3, 64, 64), "batch of 2")]:
        with pytest.raises(DreamPoseError, match=msg):
            encode_image_condition(model, img, convention="official")


def test_injected_latents_are_checked():
    model = tiny_dreampose()
    cond = encode_image_condition(model, torch.rand(3, 640, 512), convention="official", latent_mode="mode")
    poses = make_pose_windows(torch.rand(3, 2, 64, 64), 64, 64)
    with pytest.raises(DreamPoseError, match="initial latents"):
        sample(model, cond, poses, SamplingOptions(width=64, height=64, steps=2), latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(DreamPoseError, match="sampler"):
        sample(model, cond, poses, SamplingOptions(width=64, height=64, steps=2, sampler="heun"))


# ------------------------------------------------------------------------------------------ frame ranges

@pytest.mark.parametrize("per_call, tolerance", [(1, 0.0), (2, 1e-5)])
def test_a_frame_range_renders_those_frames_of_the_whole_run(per_call, tolerance):
    """Frames 2..4 of 7 rendered alone equal frames 2..4 of the whole run: their windows still see frames
    0..6 (not the range's own edges), and x_T is shared. With one frame per UNet call nothing differs at
    all; with two, only the batch composition (float rounding: 1.3e-6 of the latents' range)."""
    from dreampose.pipeline.animate import animate_clip

    model = tiny_dreampose(seed=3)
    uv = torch.rand(7, 2, 32, 32, generator=torch.Generator().manual_seed(4))
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    options = SamplingOptions(width=64, height=64, steps=3, sampler="ddim", frames_per_batch=per_call)
    whole = animate_clip(model, image, uv, options)
    part = animate_clip(model, image, uv, options, frames=slice(2, 5))
    assert part.latents.shape[0] == 3 and part.stats.unet_calls < whole.stats.unet_calls
    scale = whole.latents.abs().max().item()            # latents reach ~8: the bound is relative
    assert (part.latents - whole.latents[2:5]).abs().max().item() <= tolerance * scale   # measured 1.0e-5 at 8.2
    # what --max-frames / --first-frame did before: the range's poses alone, so its edge frames lose neighbours
    cut = animate_clip(model, image, uv[2:5], options)
    assert (cut.latents[0] - whole.latents[2]).abs().max().item() > 1e-3
    with pytest.raises(DreamPoseError, match="selects no frames"):
        animate_clip(model, image, uv, options, frames=slice(7, 9))
