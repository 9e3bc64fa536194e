"""DiT-XL/2 on ImageNet 512x512 (64x64x4 SD-VAE latents), the paper's recipe."""

from dit_jax import recipes


def get_config():
    return recipes.paper_config("DiT-XL/2", image_size=512)
