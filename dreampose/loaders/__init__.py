"""Files → networks: Stable Diffusion 1.x (diffusers folder or single file), CLIP ViT-B/32, the authors'
``.pth`` files, our ``.safetensors``, and saved subject finetunes; every path checked before any weight
is read."""
