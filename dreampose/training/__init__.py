"""Learning: the shared denoising objective, paired augmentation, the subject finetunes (paper §4.3) and
stage-1 training (paper §4) on accelerate."""
