"""``grid``: a guided sample grid of the EMA model, one row per class, as a PNG and a TensorBoard image.

For a latent run the samples are decoded through the VAE the latents were encoded with (named
in their ``metadata.json``, or ``vae``). Each evaluation writes ``WORKDIR/<name>/step_<step>.png``,
and the last step also ``WORKDIR/<name>.png`` (the demo's ``samples.png``).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from dit_jax import sharding, storage
from dit_jax.evaluators import common
from dit_jax.sampling.engine import PICTURE_CFG_SCALE
from dit_jax.sampling.image_grid import make_grid, save_image

DEFAULTS = dict(
    per_class=8,        # samples of each class (the columns)
    num_classes=10,     # the first this many classes (the rows)
    cfg_scale=PICTURE_CFG_SCALE,  # classifier-free guidance (the official sample.py's for pictures)
    sampler="ddpm",     # ddpm | ddim
    respacing="250",    # steps of the sampling chain (see diffusion.space_timesteps)
    vae="",             # latent runs: the decoder; "" = the VAE named in the latents' metadata.json
)


class Evaluator:
    def __init__(self, settings: ml_collections.ConfigDict, run: common.RunInfo, *, name: str):
        problems = common.sampling_problems(settings, run)
        if settings.per_class < 1 or settings.num_classes < 1:
            problems.append(f"per_class and num_classes must be >= 1, got {settings.per_class}, "
                            f"{settings.num_classes}")
        common.check(problems)
        self.settings, self.run_info, self.name = settings, run, name
        self.decoder = common.Decoder(run, settings.vae)
        rows = min(settings.num_classes, run.num_classes)
        self.labels = np.repeat(np.arange(rows, dtype=np.int32), settings.per_class)

    def run(self, ema: common.EmaModel) -> dict[str, Any]:
        s = self.settings
        images = ema.images(self.labels, decoder=self.decoder, seed=self.run_info.seed + 1, cfg_scale=s.cfg_scale,
                            sampler=s.sampler, respacing=s.respacing)
        grid = make_grid(images.reshape(-1, s.per_class, *images.shape[1:]))
        paths = [os.path.join(self.name, f"step_{ema.step:08d}.png")]
        if ema.step == self.run_info.last_step:
            paths.append(f"{self.name}.png")
        if sharding.is_main_process():
            for path in paths:
                (storage.path(self.run_info.workdir) / path).parent.mkdir(parents=True, exist_ok=True)
                save_image(storage.path(self.run_info.workdir) / path, grid)
        return {"grid": grid, "png": paths[-1], "sampler": f"{s.sampler} {s.respacing} steps, guidance {s.cfg_scale}",
                "decoder": self.decoder.name}


def report(result: dict[str, Any], workdir: str) -> list[str]:
    """Where the grid is and how it was sampled."""
    return [f"sample grid {storage.path(workdir) / result['png']} (a row per class; {result['sampler']})"]
