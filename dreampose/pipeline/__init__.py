"""Inference, from a key frame and a DensePose sequence to frames: images, poses, conditioning, dual
guidance, sampling, video output, and :mod:`~dreampose.pipeline.animate`, the one entry point."""
