"""DiT-B/2 on ImageNet 256x256 (32x32x4 SD-VAE latents), the paper's recipe: AdamW 1e-4, batch 256, EMA 0.9999."""

from dit_jax import recipes


def get_config():
    return recipes.paper_config("DiT-B/2", image_size=256)
