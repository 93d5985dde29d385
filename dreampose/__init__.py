"""DreamPose (Karras et al., ICCV 2023) as a plain PyTorch library: no ComfyUI imports here.

Stages: load (``model.load_dreampose``) → encode the subject once
(``conditioning.encode_image_condition``) → pose windows (``poses.make_pose_windows``) →
dual-CFG sampling (``sampling.sample``) → frames (``sampling.decode_latents``). Optionally, before
encoding: subject finetuning (``finetune.finetune_subject``, ``finetune.finetune_vae_decoder``).
"""
__version__ = "0.1.0"
