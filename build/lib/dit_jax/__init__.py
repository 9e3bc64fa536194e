"""dit_jax: DiT (Peebles & Xie, 2023) in JAX/Flax NNX."""
