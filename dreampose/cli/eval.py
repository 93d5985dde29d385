"""``python -m dreampose eval``: metrics of a model on prepared test videos, or the paper's Table 2.

Every input is checked before any weights are read (videos, sizes, ablation names, weight files);
the work itself is :mod:`dreampose.evaluation.evaluate`, the metrics :mod:`dreampose.evaluation.metrics`;
the sampling and finetune flags are :class:`~dreampose.settings.EvalSettings`.
"""
from __future__ import annotations

import argparse
import time

from ..settings import EvalSettings
from .common import add_device_args, add_options, check_paths, check_run_folder, err, job_record, options_from_args

# what eval writes into --out
OUTPUTS = ("metrics.json", "metrics.md", "frames")

EPILOG = """\
Examples:
  python -m dreampose eval --data test/ --clip clip-vit-b32/ --dreampose model.safetensors --out eval/
  python -m dreampose eval --data test/ --clip clip-vit-b32/ --out ablation/ --finetune-steps 500 \\
      --vae-finetune-steps 1500 --ablation full=full.safetensors clip=clip_only.safetensors \\
      onepose=one_pose.safetensors

Feature metrics run only with weights on this machine (never downloaded): --vgg-weights (VGG),
--lpips-weights (+ VGG16 weights: LPIPS), --inception-weights (FID, torchvision's Inception: not
comparable with published FIDs), --i3d-weights (FVD, a TorchScript I3D). torchvision's standard
files in $TORCH_HOME/hub/checkpoints are found by themselves (--no-discover turns that off).
"""


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="metrics of a model on prepared test videos (L1, SSIM, VGG, LPIPS, pose IoU, flicker, "
                     "FID, FVD), or the paper's Table-2 ablation",
        description="Each prepared test video: its frame --key-frame is the subject photo, all its DensePose "
                    "files drive the animation, its frames are the ground truth (the key frame is left out "
                    "of the metrics). Writes metrics.json and metrics.md to --out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and weights")
    g.add_argument("--data", required=True, nargs="+", metavar="DIR",
                   help="folder(s) of prepared videos (searched recursively)")
    g.add_argument("--clip", help="CLIP ViT-B/32 vision model: a folder (config.json + weights) or one file")
    model = g.add_mutually_exclusive_group(required=True)
    model.add_argument("--dreampose", metavar="BUNDLE", help="the DreamPose .safetensors to evaluate")
    model.add_argument("--ablation", nargs="+", metavar="NAME=FILE",
                       help="the paper's Table 2: full=FILE (required) clip=FILE onepose=FILE; rows Ours_CLIP, "
                            "Ours_No-VAE-FT, Ours_1-pose, Ours_full with identical seeds and settings")
    g.add_argument("--base", help="Stable Diffusion 1.x (VAE and scheduler) for bundles without a VAE")
    g.add_argument("--vae", help="a VAE file or folder to use instead of the bundle's")
    g.add_argument("--out", required=True, metavar="DIR", help="where metrics.json / metrics.md (and frames) go")
    groups: dict = {}
    add_options(p, EvalSettings, ("key_frame", "max_frames", "finetune_steps", "vae_finetune_steps", "finetune_lr",
                                  "vae_finetune_lr", "steps", "sampler", "s_image", "s_pose", "seed",
                                  "frames_per_batch", "guidance_start", "guidance_end", "reference_attention",
                                  "cross_frame_attention", "cross_frame_anchor", "uv_smoothing", "width", "height"),
                groups=groups)
    m = groups.setdefault("metrics", p.add_argument_group("metrics"))
    m.add_argument("--vgg-weights", metavar="FILE", help="torchvision VGG16/VGG19 state dict (VGG; VGG16 also "
                                                         "serves LPIPS)")
    m.add_argument("--lpips-weights", metavar="FILE", help="the lpips package's v0.1 vgg.pth linear layers")
    m.add_argument("--inception-weights", metavar="FILE", help="torchvision inception_v3 state dict (FID)")
    m.add_argument("--i3d-weights", metavar="FILE",
                   help="I3D TorchScript (FVD), called as net(x, rescale=False, resize=False, "
                        "return_features=True) on x [N,3,16,224,224] in -1..1; the file's code is run")
    m.add_argument("--no-discover", action="store_true",
                   help="do not look for standard weight files in $TORCH_HOME/hub/checkpoints")
    add_options(p, EvalSettings, ("shuffle_seed", "save_frames"), groups=groups)
    groups["output"].add_argument("--quiet", action="store_true", help="no progress lines")
    groups["output"].add_argument("--force", action="store_true",
                                  help="replace the reports and frames another run left in --out")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    # 1. everything the user gave, checked before any model weights are read (a wrong path before the
    # evaluation stack is imported)
    inputs = [(f"--{n}", getattr(args, n, None)) for n in ("clip", "base", "vae", "dreampose")]
    inputs += [("--data", d) for d in (args.data if isinstance(args.data, list) else [args.data])]
    check_run_folder(args, OUTPUTS, inputs, record="metrics.json")
    check_paths(clip=args.clip, base=args.base, vae=args.vae)

    from ..evaluation import evaluate as E
    from ..evaluation.metrics import load_feature_nets
    from ..files.atomic import output_set
    from ..models.devices import resolve_device, resolve_dtype

    settings = options_from_args(args, EvalSettings()).check()   # all of it, before any model loads
    if args.ablation:
        variants = E.ablation_variants(E.parse_ablation(args.ablation), settings)
    else:
        variants = E.single_variant(args.dreampose, settings)
    E.check_variants(variants, clip=args.clip)
    videos = E.plan_videos(args.data, settings, warn=err)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    nets = load_feature_nets(args.vgg_weights, args.lpips_weights, args.inception_weights, args.i3d_weights,
                             device=device, discover=not args.no_discover)
    for status in nets.status().values():
        err(f"metric weights: {status}")
    err(f"{len(videos)} video(s); rows: {', '.join(v.row for v in variants)}")

    # 2. the run
    t0 = time.perf_counter()
    with output_set():    # frames and reports appear together, or (error, Ctrl-C) none does
        result = E.evaluate(variants, videos, settings, clip=args.clip, base=args.base, vae=args.vae, device=device,
                            dtype=dtype, nets=nets, out=args.out, log=None if args.quiet else err)
        result["seconds"] = time.perf_counter() - t0
        result.update(job_record(args))
        js, md = E.write_reports(result, args.out)
    print(E.markdown_report(result), end="")
    print(f"wrote {js} and {md} in {result['seconds']:.1f} s")
    return 0
