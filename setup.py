"""Install dit_jax as a package (``pip install -e .``)."""
from setuptools import find_packages, setup

setup(
    name="dit_jax",
    version="0.1.0",
    description="Scalable Diffusion Models with Transformers (DiT) in JAX/Flax NNX.",
    packages=find_packages(include=["dit_jax", "dit_jax.*"]),
    package_data={"dit_jax": ["imagenet_classes.tsv"]},
    python_requires=">=3.10",
    install_requires=[
        line.strip()
        for line in open("requirements.txt")
        if line.strip() and not line.startswith("#")
    ],
)
