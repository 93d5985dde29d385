"""The CLIP-VAE embedding adapter that replaces Stable Diffusion's text encoder (paper §4.2).

Shapes, parameter names and initialisation follow the authors' released ``adapter_N.pth`` so those
files load unchanged: ``vae2clip`` maps each pooled VAE latent channel (40·32 = 1280 values at the
fixed 640×512 conditioning size) to a CLIP-width token, and ``linear1`` mixes the 50 CLIP tokens
plus the 4 VAE tokens back to 50 tokens. ``linear1`` starts as an identity over the CLIP tokens
and zero over the VAE tokens, so a fresh adapter passes CLIP through and ignores the VAE path.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

# Official sizes: CLIP ViT-B/32 at 224 px gives 50 tokens of width 768; the SD VAE latent of the
# 640×512 key frame is 4×80×64, max-pooled by 2 to 4×40×32 = 4 tokens of 1280 features.
CLIP_TOKENS = 50
CLIP_WIDTH = 768
VAE_TOKENS = 4
VAE_FEATURES = 40 * 32


class EmbeddingAdapter(nn.Module):
    """Joins CLIP image tokens and VAE latent tokens into UNet cross-attention states."""

    def __init__(self, clip_width: int = CLIP_WIDTH, clip_tokens: int = CLIP_TOKENS,
                 vae_tokens: int = VAE_TOKENS, vae_features: int = VAE_FEATURES):
        super().__init__()
        self.clip_width, self.clip_tokens = clip_width, clip_tokens
        self.vae_tokens, self.vae_features = vae_tokens, vae_features
        self.pool = nn.MaxPool2d(2)
        self.vae2clip = nn.Linear(vae_features, clip_width)
        self.linear1 = nn.Linear(clip_tokens + vae_tokens, clip_tokens)
        with torch.no_grad():  # VAE tokens start at zero weight (paper: avoid "shock" in finetuning)
            self.linear1.weight.copy_(torch.eye(clip_tokens, clip_tokens + vae_tokens))

    def forward(self, clip_tokens: torch.Tensor, vae_latent: torch.Tensor) -> torch.Tensor:
        """``clip_tokens`` [B,50,W] and ``vae_latent`` [B,4,h,w] (pooled h·w/4 must be 1280) → [B,50,W]."""
        pooled = rearrange(self.pool(vae_latent), "b c h w -> b c (h w)")
        if pooled.shape[-1] != self.vae_features:
            raise ValueError(
                f"the VAE conditioning latent is {tuple(vae_latent.shape[-2:])}, which pools to "
                f"{pooled.shape[-1]} features; the adapter needs {self.vae_features} "
                "(encode the key frame at 640×512)")
        vae_tokens = self.vae2clip(pooled)
        tokens = torch.cat((clip_tokens, vae_tokens), dim=1)
        return rearrange(self.linear1(rearrange(tokens, "b t d -> b d t")), "b d t -> b t d")


def hold_vae_tokens_at_zero(adapter) -> None:
    """CLIP-only conditioning (paper Table 2, Ours_CLIP): zero the adapter's weights on the VAE tokens and
    mask their gradient, so AdamW (zero gradient → zero moments → zero step; decay of 0 is 0) keeps
    them exactly zero and the VAE path never contributes."""
    weight = adapter.linear1.weight
    with torch.no_grad():
        weight[:, adapter.clip_tokens:] = 0
    mask = torch.ones_like(weight)
    mask[:, adapter.clip_tokens:] = 0
    weight.register_hook(lambda grad: grad * mask)
