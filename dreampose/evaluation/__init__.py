"""Measuring: metrics (L1, SSIM, pose IoU, flicker, feature metrics from local weights), the evaluation of
models on prepared videos (the paper's Table 2), and the benchmarks."""
