"""PyTorch reference timings beside ours: the training step and guided sampling of diffusers' DiT.

``side_by_side`` calls these (``python -m dit_jax.benchmark --torch`` / ``--sample_torch``). Nothing
here touches JAX's devices: on a GPU, PyTorch runs first and frees its cached memory, then JAX takes
the device.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import ml_collections
import numpy as np

from dit_jax import diffusion as gd
from dit_jax.models import architecture
from dit_jax.perf.timing import summary, timed


def torch_train_benchmark(config: ml_collections.ConfigDict, *, steps: int, warmup: int,
                          torch_compile: bool | str = False) -> dict[str, Any]:
    """The same training step in PyTorch: diffusers' ``DiTTransformer2DModel``, AdamW and EMA.

    Both sides draw timesteps, noise and label dropout per step, run the DiT on the noised
    batch and backpropagate mse(eps) + vb, then take an AdamW step and update the EMA.
    ``train.train_step`` computes the official vb (KL of the true posterior to the
    predicted one, the decoder NLL where t = 0) and the gradient norm; this side computes
    the KL for every t (the elementwise work of both is negligible next to the transformer).
    diffusers' DiT gives every block its own timestep/label embedder, so it has more
    parameters (``num_params``) than the official DiT; its attention is PyTorch's
    ``scaled_dot_product_attention``. ``config.dtype`` bfloat16 runs the model under
    ``torch.autocast`` (float32 weights and optimiser, bfloat16 matmuls: PyTorch's form of our
    mixed precision). Runs on CUDA if available, else on the CPU with one thread per core; on
    CUDA it frees its cached memory when done, so JAX can take the device after it.

    What a PyTorch user would do for speed: ``torch_compile`` wraps the model in ``torch.compile``
    (``True``: the default inductor backend; a string names another backend) and the warm-up
    steps compile it; on CUDA, AdamW is the fused kernel, and SDPA dispatches bfloat16 attention
    to its flash kernel.
    """
    import torch  # only this benchmark needs PyTorch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    m = config.model
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1, got {steps}, {warmup}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    channels, n = m.in_channels, config.train.batch_size
    model = _diffusers_dit(config, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.train.weight_decay, fused=device.type == "cuda")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.train.ema_decay))
    backend = ("inductor" if torch_compile is True else torch_compile) or None
    forward = torch.compile(model, backend=backend) if backend else model
    # The chain's tables from NumPy: a JAX array here would start JAX's backend, which takes
    # 75% of a GPU's memory before PyTorch has run.
    num_timesteps = config.diffusion.steps
    host_tables = gd.chain_tables(gd.get_beta_schedule(config.diffusion.noise_schedule, num_timesteps))
    tables = {name: torch.tensor(host_tables[name], dtype=torch.float32, device=device) for name in (
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
        "posterior_log_variance_clipped", "log_betas")}
    x = torch.randn(n, channels, m.input_size, m.input_size, device=device)  # NCHW, as diffusers wants
    y = torch.randint(0, m.num_classes, (n,), device=device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")
    compute_dtypes = set()

    def loss_fn() -> torch.Tensor:
        t = torch.randint(0, num_timesteps, (n,), device=device)
        at = {name: table[t].view(n, 1, 1, 1) for name, table in tables.items()}
        noise = torch.randn_like(x)
        x_t = at["sqrt_alphas_cumprod"] * x + at["sqrt_one_minus_alphas_cumprod"] * noise
        with torch.autocast(**autocast):
            out = forward(x_t, timestep=t, class_labels=y).sample
        compute_dtypes.add(str(out.dtype).removeprefix("torch."))
        out = out.float()
        if not m.learn_sigma:
            return ((noise - out) ** 2).mean()
        eps, var_values = out.split(channels, dim=1)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        true_mean = at["posterior_mean_coef1"] * x + at["posterior_mean_coef2"] * x_t
        true_log_var = at["posterior_log_variance_clipped"]
        frac = (var_values + 1) / 2
        log_var = frac * at["log_betas"] + (1 - frac) * true_log_var
        pred_x0 = at["sqrt_recip_alphas_cumprod"] * x_t - at["sqrt_recipm1_alphas_cumprod"] * eps.detach()
        mean = at["posterior_mean_coef1"] * pred_x0 + at["posterior_mean_coef2"] * x_t
        kl = 0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        return (mse + kl.mean(dim=(1, 2, 3)) / np.log(2.0)).mean()

    def call() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        ema.update_parameters(model)
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = timed(call, steps, warmup)
    result = {"num_params": sum(p.numel() for p in model.parameters()), "device": str(device),
              "compute_dtype": "/".join(sorted(compute_dtypes)), "threads": torch.get_num_threads(), "batch": n,
              "compile": f"torch.compile({backend})" if backend else "eager", "steps": steps, **summary(seconds, n)}
    del model, forward, optimizer, ema, tables, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _diffusers_dit(config: ml_collections.ConfigDict, device: Any) -> Any:
    """diffusers' ``DiTTransformer2DModel`` with ``config.model``'s patch, width, depth, heads, sigma and classes."""
    from diffusers import DiTTransformer2DModel

    m, arch = config.model, architecture(config.model)
    if m.block_type != "adaln_zero" or m.mlp_ratio != 4.0 or m.class_dropout_prob != 0.1:
        raise ValueError("diffusers' DiT is adaLN-Zero with mlp_ratio 4 and label dropout 0.1; got block_type="
                         f"{m.block_type}, mlp_ratio={m.mlp_ratio}, class_dropout_prob={m.class_dropout_prob}")
    return DiTTransformer2DModel(
        num_attention_heads=arch["num_heads"], attention_head_dim=arch["hidden_size"] // arch["num_heads"],
        in_channels=m.in_channels, out_channels=2 * m.in_channels if m.learn_sigma else m.in_channels,
        num_layers=arch["depth"], sample_size=m.input_size, patch_size=arch["patch_size"],
        num_embeds_ada_norm=m.num_classes, norm_eps=1e-6).to(device)


def _sd_vae(device: Any) -> Any:
    """diffusers' ``AutoencoderKL`` shaped as Stable Diffusion's VAE (``vae.VAEConfig``'s defaults), randomly
    initialised: its decode time does not depend on the weights."""
    from diffusers import AutoencoderKL

    from dit_jax.vae import VAEConfig

    v = VAEConfig()
    blocks = len(v.block_out_channels)
    return AutoencoderKL(in_channels=v.in_channels, out_channels=v.out_channels, latent_channels=v.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
                         norm_num_groups=v.norm_num_groups, scaling_factor=v.scaling_factor).to(device).eval()


def torch_sample_benchmark(config: ml_collections.ConfigDict, *, num_steps: int, cfg_scale: float,
                           repeats: int, tf32: bool = False, decode: bool = False) -> dict[str, Any]:
    """Guided DDPM sampling of ``train.batch_size`` latents in PyTorch, as the official ``sample.py`` runs it.

    Eager, under ``torch.no_grad``: the batch doubled (conditional half, null label 1000 half, the
    same latents), diffusers' DiT on the doubled batch, guidance on the first 3 eps channels
    (``forward_with_cfg``), then the learned-range ``p_sample`` step with fresh noise, for each
    of the ``num_steps`` respaced steps. Untimed: one warm-up model call; then ``repeats``
    timed chains. bfloat16 runs the model under ``torch.autocast``; ``tf32`` instead runs it in
    float32 with TF32 matmuls and convolutions allowed (the official ``sample_ddp.py``'s settings; on
    a CPU plain float32). With ``decode`` each chain ends with the SD-VAE decode of its latents to
    pixels (``_sd_vae``, in float32 or TF32), timed with it.
    """
    import torch  # only this benchmark needs PyTorch

    m, n = config.model, config.train.batch_size
    if not m.learn_sigma:
        raise ValueError("the sampling side by side runs the official learned-sigma chain: model.learn_sigma=True")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    model = _diffusers_dit(config, device).eval()
    vae = _sd_vae(device) if decode else None
    allowed = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    betas, kept = gd.respaced_betas(str(num_steps), noise_schedule=config.diffusion.noise_schedule,
                                    diffusion_steps=config.diffusion.steps)
    host_tables = gd.chain_tables(betas)  # NumPy: JAX must not start before PyTorch is done (GPU memory)
    tables = {name: torch.tensor(host_tables[name], dtype=torch.float32, device=device) for name in (
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
        "posterior_log_variance_clipped", "log_betas")}
    timesteps = torch.tensor(kept, device=device)
    c = m.in_channels
    y = torch.cat([torch.arange(n, device=device) % m.num_classes, torch.full((n,), m.num_classes, device=device)])
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16" and not tf32)

    def forward_with_cfg(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = x[: len(x) // 2]
        with torch.autocast(**autocast):
            out = model(torch.cat([half, half]), timestep=timesteps[t], class_labels=y).sample
        out = out.float()
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    def chain(steps: int) -> torch.Tensor:
        z = torch.randn(n, c, m.input_size, m.input_size, device=device)
        x = torch.cat([z, z])
        for i in reversed(range(num_steps - steps, num_steps)):
            t = torch.full((2 * n,), i, device=device, dtype=torch.long)
            at = {name: table[t].view(-1, 1, 1, 1) for name, table in tables.items()}
            eps, var_values = forward_with_cfg(x, t).split(c, dim=1)
            frac = (var_values + 1) / 2
            log_var = frac * at["log_betas"] + (1 - frac) * at["posterior_log_variance_clipped"]
            pred_x0 = at["sqrt_recip_alphas_cumprod"] * x - at["sqrt_recipm1_alphas_cumprod"] * eps
            mean = at["posterior_mean_coef1"] * pred_x0 + at["posterior_mean_coef2"] * x
            x = mean + (i != 0) * torch.exp(0.5 * log_var) * torch.randn_like(x)
        if vae is not None:
            x = vae.decode(x[:n] / vae.config.scaling_factor).sample
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x[:n]

    with torch.no_grad():
        chain(1)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            chain(num_steps)
            seconds.append(time.perf_counter() - start)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allowed
    result = {"precision": "float32+tf32" if tf32 else "bfloat16 autocast" if autocast["enabled"] else "float32",
              "vae_decode": decode, "num_params": sum(p.numel() for p in model.parameters()), "device": str(device),
              "threads": torch.get_num_threads(), "images": n, "seconds": seconds,
              "seconds_median": statistics.median(seconds), "images_per_sec": n / statistics.median(seconds)}
    del model, vae, tables
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
