"""``python -m dreampose demo``: the shipped demo DreamPose animates an unseen synthetic person.

No download and no input files: the key frame, its DensePose, the driving motion and the ground
truth come from the synthetic world's test split (:func:`dreampose.demo.model.demo_scene`). As in
the paper, the model is first finetuned on the key frame (UNet + adapter, then the VAE decoder), then
the motion is sampled through the same path as ``animate``.
"""
from __future__ import annotations

import os
import time

from ..settings import (DEMO_FINETUNE_LR, DEMO_FINETUNE_STEPS, DEMO_FPS, DEMO_FRAMES, DEMO_SAMPLING,
                        DEMO_VAE_FINETUNE_STEPS, MAX_FINETUNE_STEPS, MOTIONS)
from .animate import OUTPUTS as ANIMATE_OUTPUTS
from .animate import add_sampling_args, check_run_options, run_animation, summary, write_run_info
from .common import (StepBar, add_device_args, err, int_at_least, load_image, positive_float,
                     read_init_latents)

DEMO_NOTICE = ("NOTE: the demo model is a small DreamPose (a few MB, shipped in the package) trained with "
               "`python -m dreampose train` on the synthetic world of dreampose/data/world.py, so it animates "
               "synthetic people only. For real photos use `python -m dreampose animate` with the released "
               "DreamPose weights.")


MAX_DEMO_FRAMES = 1000     # the whole clip is held in memory (and the GIFs are built from it)


def register(sub) -> None:
    p = sub.add_parser("demo", help="animate an unseen synthetic person with the shipped demo model (no download)",
                       description="The shipped demo DreamPose (trained on the synthetic world) animates a test-split "
                                   "subject through a motion it never saw. Writes PNG frames, an MP4, a GIF, a "
                                   "contact sheet (driving pose / generated / ground truth) and the pose-alignment "
                                   "IoU against a shuffled pose order.")
    p.add_argument("--out", default="dreampose_demo", help="output folder (default ./dreampose_demo)")
    p.add_argument("--image", help="use this key frame instead of the synthetic subject's")
    p.add_argument("--frames", type=int_at_least(2, MAX_DEMO_FRAMES), default=DEMO_FRAMES,
                   help=f"number of pose frames (default {DEMO_FRAMES}, at most {MAX_DEMO_FRAMES})")
    p.add_argument("--subject", type=int_at_least(0, 2 ** 32 - 1), default=0,
                   help="which test-split subject of the synthetic world, 0 … 2**32-1 (default 0)")
    p.add_argument("--motion", choices=MOTIONS, help="motion family (default: the subject's)")
    p.add_argument("--finetune-steps", type=int_at_least(0, MAX_FINETUNE_STEPS), default=DEMO_FINETUNE_STEPS,
                   help=f"UNet+adapter finetune steps on the key frame, the paper's subject phase "
                        f"(default {DEMO_FINETUNE_STEPS}; 0: none)")
    p.add_argument("--vae-finetune-steps", type=int_at_least(0, MAX_FINETUNE_STEPS), default=DEMO_VAE_FINETUNE_STEPS,
                   help=f"VAE decoder finetune steps on the key frame (default {DEMO_VAE_FINETUNE_STEPS}; 0: none)")
    p.add_argument("--finetune-lr", type=positive_float, default=DEMO_FINETUNE_LR,
                   help=f"learning rate of both finetunes (default {DEMO_FINETUNE_LR:g})")
    add_sampling_args(p, DEMO_SAMPLING, DEMO_FPS)
    add_device_args(p)
    p.set_defaults(func=run)


# what the demo writes into --out, besides animate's files
OUTPUTS = (*ANIMATE_OUTPUTS, "key_frame.png", "poses", "dreampose.gif", "contact_sheet.png", "comparison.gif")


def run(args) -> int:
    from ..demo.model import demo_scene, finetune_on_key_frame, load_demo_model
    from ..files.atomic import output_set
    from ..models.devices import resolve_device, resolve_dtype

    options = check_run_options(args, DEMO_SAMPLING, OUTPUTS)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    scene = demo_scene(args.frames, args.subject, args.motion, options.height, options.width)
    image = load_image(args.image) if args.image else scene["key_frame"]
    uv = scene["uv"]
    args.init_latents_tensor = (read_init_latents(args.init_latents, args.frames, options.height, options.width)
                                if args.init_latents else None)
    print(DEMO_NOTICE, flush=True)
    if args.image:
        err("warning: the demo model only knows the synthetic world; a real photo will not animate well")

    t0 = time.perf_counter()
    model = load_demo_model().place(device, dtype)
    load_s = time.perf_counter() - t0
    finetune_s = 0.0
    if args.image and (args.finetune_steps or args.vae_finetune_steps):
        err("warning: no DensePose for --image, so no subject finetune; the frames will not look like the photo")
    elif args.finetune_steps or args.vae_finetune_steps:
        t0 = time.perf_counter()
        bars = {"subject": StepBar("finetune UNet+adapter", args.quiet),
                "vae": StepBar("finetune VAE decoder", args.quiet)}
        model = finetune_on_key_frame(model, image, scene["key_uv"], steps=args.finetune_steps,
                                      vae_steps=args.vae_finetune_steps, lr=args.finetune_lr, seed=options.seed,
                                      height=options.height, width=options.width,
                                      callback=lambda stage, step, total, loss: bars[stage](step, total, loss))
        finetune_s = time.perf_counter() - t0
    with output_set():      # every file of the demo appears together, or (error, Ctrl-C) none does
        return _write_outputs(args, options, model, image, uv, scene, device, dtype, load_s, finetune_s)


def _write_outputs(args, options, model, image, uv, scene, device, dtype, load_s: float, finetune_s: float) -> int:
    import numpy as np

    from ..data.densepose import visualize
    from ..data.world import body_mask, silhouette
    from ..demo.config import DEMO_FILE
    from ..evaluation.metrics import pose_alignment
    from ..pipeline.poses import save_uv_folder
    from ..pipeline.video import contact_sheet, save_image, save_png_frames, to_uint8, write_gif

    os.makedirs(args.out, exist_ok=True)
    # the inputs too, so `animate` can be tried on them and a person can see what went in
    save_png_frames(image.permute(1, 2, 0).unsqueeze(0), args.out, pattern="key_frame.png")
    pose_dir = os.path.join(args.out, "poses")
    save_uv_folder(pose_dir, uv, overwrite=True)   # replaces the poses an earlier demo left in its own folder

    result = run_animation(model, image, uv, options, args, quiet=args.quiet)
    frames = result.pop("video")                                      # [F,H,W,3] 0..1
    alignment = pose_alignment(silhouette(frames.permute(0, 3, 1, 2)), body_mask(uv), shuffle_seed=options.seed)
    gif = write_gif(frames, os.path.join(args.out, "dreampose.gif"), fps=args.fps)
    rows = [visualize(uv), frames, scene["truth"].permute(0, 2, 3, 1)]
    sheet = save_image(contact_sheet(rows), os.path.join(args.out, "contact_sheet.png"))
    side_by_side = [contact_sheet([np.concatenate([to_uint8(row[t]) for row in rows])]) for t in range(len(frames))]
    comparison = write_gif(np.stack(side_by_side), os.path.join(args.out, "comparison.gif"), fps=args.fps)
    result["written"].update(gif=gif, contact_sheet=sheet, comparison=comparison)
    shuffled = alignment["shuffled_iou"]
    result["timings"]["finetune_s"] = finetune_s
    write_run_info(args, options, result, device, dtype, {
        "model": os.path.basename(DEMO_FILE), "subject": scene["subject"], "motion": scene["motion"],
        "pose_alignment": {"iou": alignment["iou"], "shuffled_iou": shuffled, "per_frame": alignment["per_frame"]}})
    summary(result, args, options, device, dtype, load_s)
    print(f"inputs: {os.path.join(args.out, 'key_frame.png')} and {pose_dir}/frame_N_densepose.npy "
          f"({scene['subject']}, motion {scene['motion']!r}: never seen in training)")
    if finetune_s:
        print(f"subject finetune on the key frame: {args.finetune_steps} UNet+adapter and {args.vae_finetune_steps} "
              f"VAE-decoder steps in {finetune_s:.1f} s")
    print(f"also: {gif}, {sheet} (rows: driving pose, generated, ground truth) and {comparison} (the three side "
          "by side)")
    control = f"{shuffled:.3f}" if shuffled is not None else "n/a (one frame)"
    print(f"pose alignment: IoU {alignment['iou']:.3f} between the generated person and the driving pose; "
          f"{control} against the same poses in a shuffled order")
    return 0
