"""Inception features in tests: the FID network of torch-fidelity (the reference the port is compared
with) on random, calibrated weights, a cheap stand-in computed from pixel statistics, and a command run with
the stand-in (``python -m tests.inception_features dit_jax.<command> FLAGS...``)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.fake_images import natural_image


def fake_features(images: np.ndarray, *, adm_sizes: bool = False) -> dict[str, np.ndarray]:
    """A cheap stand-in for the Inception features (the wiring is tested with it; the network in test_inception).

    16 pool, 12 spatial and 6 logit values from pixel statistics; ``adm_sizes``: the same values
    spread over the network's 2048 / 2023 / 1008 (what ``adm_npz.read_statistics`` checks).
    """
    x = images.astype(np.float64) / 255.0
    pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, ::4, ::4].reshape(len(x), -1)[:, :10]], 1)
    feats = {"pool": pool, "spatial": x[:, ::2, ::2, 0].reshape(len(x), -1)[:, :12], "logits": pool[:, :6] * 5}
    if adm_sizes:
        from dit_jax.fid import inception

        sizes = {"pool": inception.POOL_DIM, "spatial": inception.SPATIAL_DIM, "logits": inception.NUM_LOGITS}
        feats = {k: (np.resize(v.T, (sizes[k], len(v))).T * np.linspace(1, 2, sizes[k])).astype(np.float32)
                 for k, v in feats.items()}
    return feats


def torch_fidelity_inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3`` without running the package's ``__init__``
    (which imports torchvision, which does not import beside this torch)."""
    import importlib
    import importlib.util
    import sys
    import types

    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def random_inception_state_dict(seed: int = 0) -> dict[str, Any]:
    """Random FID-InceptionV3 weights in the files' names (torch tensors), BatchNorm statistics
    calibrated on natural-looking images so every layer's activations stay healthy (not dead, not huge)."""
    import torch

    from dit_jax.fid.inception import expected_weights

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_weights().items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            state[name] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight"):
            state[name] = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen) + (0.2 if "bn" in name else 0.0)
        elif name.endswith("running_mean"):
            state[name] = torch.zeros(shape)
        else:
            state[name] = torch.ones(shape)
    # Calibrate: a pre-hook on every BatchNorm sets its statistics from its input, in one pass.
    model = _inception_torch_module(state)
    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            def hook(bn, args):
                x = args[0].double()
                bn.running_mean.copy_(x.mean(dim=(0, 2, 3)).float())
                bn.running_var.copy_(x.var(dim=(0, 2, 3)).float() + 1e-2)
            hooks.append(module.register_forward_pre_hook(hook))
    rng = np.random.default_rng(seed)
    images = np.stack([natural_image(rng, 96, 96) for _ in range(3)])
    with torch.no_grad():
        model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    for h in hooks:
        h.remove()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in state}


def _inception_torch_module(state: dict[str, Any], dtype: str = "float32"):
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pth"
        torch.save(state, path)
        model = torch_fidelity_inception_class()("inception-v3-compat", ["2048", "logits_unbiased"],
                                                 feature_extractor_weights_path=str(path))
    if dtype == "float64":  # its own float64 option maps to float32 (torch-fidelity 0.4.0's text_to_dtype)
        model = model.double()
        model.feature_extractor_internal_dtype = torch.float64
    return model


def torch_fidelity_features(state: dict[str, Any], images: np.ndarray, dtype: str = "float32") -> dict[str, np.ndarray]:
    """torch-fidelity's pool_3 and bias-free logits, plus Mixed_6d's and Mixed_6e's 1x1 branches (NCHW)."""
    import torch

    model = _inception_torch_module(state, dtype)
    taps = {}
    for block in ("Mixed_6d", "Mixed_6e"):
        getattr(model, block).branch1x1.register_forward_hook(
            lambda m, a, out, block=block: taps.__setitem__(block, out.double().numpy()))
    with torch.no_grad():
        pool, logits = model(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).contiguous())
    return {"pool": pool.double().numpy(), "logits": logits.double().numpy(), **taps}


def run_command_with_fake_features(module: str, argv: list[str]) -> None:
    """Run ``python -m <module> ARGV`` in this process with the FID network stood in by ``fake_features``
    (ADM's sizes): everything else (flags, weights, files) is the command's own, at a fraction of the
    network's memory and time."""
    import runpy

    from dit_jax.fid import inception

    inception.create_inception = lambda weights=None, **_: None
    inception.create_feature_fn = lambda model, **_: functools.partial(fake_features, adm_sizes=True)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # python -m tests.inception_features dit_jax.<command> FLAGS...
    run_command_with_fake_features(sys.argv[1], sys.argv[2:])
