"""Config building blocks shared by ``configs/*.py``: the base config and the paper's recipe.

Each field is documented where it is set; ``--config.a.b=value`` overrides any of them.
"""

from __future__ import annotations

import ml_collections

from dit_jax.sampling.engine import FID_CFG_SCALE, PICTURE_CFG_SCALE


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the paper's training recipe as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"               # compute dtype: float32 | bfloat16 (params, optimiser state, losses stay float32)
    c.remat = "none"                  # none | block | dots (recompute each block's activations / all but its matmul outputs in the backward pass)
    c.attention = "auto"              # auto (cudnn on NVIDIA GPUs in bfloat16 where it compiles, else xla) | xla | cudnn (fused flash attention)
    # How the passes around the matmuls are computed (same parameters, same values; dit_jax/model_compute.py):
    c.qkv = "fused"                   # fused | split (q, k, v by three matmuls over slices of the fused kernel: no slicing of one [.., 3, ..] tensor)
    c.gelu_backward = "saved"         # saved | recompute (the MLP's bias + GELU saves only fc1's matmul output and recomputes the GELU backward)
    c.norm_modulate = "xla"           # xla | fused (adaLN LayerNorm + modulation as one function with a one-pass custom backward)

    # Device mesh (see dit_jax/sharding.py): sizes of its axes, one of them may be -1 = the rest.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                  # data parallel: the batch is split over data x fsdp
    c.mesh.fsdp = 1                   # fully sharded data parallel: large weights split over this axis
    c.mesh.tensor = 1                 # tensor parallel attention/MLP (must divide num_heads)

    c.model = ml_collections.ConfigDict()
    c.model.name = "DiT-XL/2"         # a paper model (models.MODELS), or "" for the explicit fields below
    c.model.patch_size = 2            # explicit architecture, used only when name == ""
    c.model.hidden_size = 1152
    c.model.depth = 28
    c.model.num_heads = 16
    c.model.mlp_ratio = 4.0
    c.model.input_size = 32           # latent (or pixel) height = width
    c.model.in_channels = 4
    c.model.num_classes = 1000
    c.model.class_dropout_prob = 0.1  # label dropout, makes classifier-free guidance possible
    c.model.learn_sigma = True
    c.model.block_type = "adaln_zero"  # adaln_zero | adaln | cross_attention | in_context
    c.model.guidance = "official"      # official (first 3 channels) | all
    c.model.scan_blocks = False        # blocks' parameters stacked [depth, ...] and run as one lax.scan (faster compile)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.noise_schedule = "linear"
    c.diffusion.steps = 1000

    c.data = ml_collections.ConfigDict()
    c.data.source = "latents"         # latents (pre-encoded ImageNet) | synthetic
    c.data.latents_dir = ""           # latents only: a folder written by `python -m dit_jax.extract_latents`
    c.data.verify_latents = False     # latents only: check every shard's SHA-256 at start (reads all once)
    c.data.random_flip = True         # left-right flips with probability 1/2 (the paper's only augmentation)
    c.data.num_train = 0              # synthetic only: examples generated
    c.data.image_size = 0             # synthetic only: pixel size (= model.input_size)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400_000
    c.train.batch_size = 256          # global batch
    c.train.lr = 1e-4                 # AdamW peak learning rate
    c.train.lr_schedule = "constant"  # constant (the paper) | cosine (decays to 0 at train.steps)
    c.train.warmup_steps = 0          # linear warmup from 0 (the paper: none)
    c.train.weight_decay = 0.0
    c.train.ema_decay = 0.9999
    c.train.ema_debias = False        # bias-correct the EMA so it forgets the initial weights (short runs; the paper: no)
    c.train.log_every = 100           # metrics (TensorBoard, metrics.jsonl, console) every this many steps
    c.train.checkpoint_every = 5_000  # async Orbax checkpoint every this many steps (also at the end and on SIGTERM)
    c.train.max_to_keep = 3           # newest checkpoints kept in WORKDIR/checkpoints
    c.train.checkpoint_atomicity = "auto"  # how a step is committed: auto | rename | commit_file (gcsfuse mounts)
    c.train.profile_steps = 0         # profile this many steps (from 10 steps after the start) to WORKDIR; 0 = off
    c.train.init_from = ""            # fine-tune: start from these weights (weights.load.load_dit forms), fresh optimiser

    # Evaluations of the EMA model (dit_jax/evaluators/<type>.py), each {type, every, its settings}:
    # every N > 0 steps and at the last step; 0 = the last step only; -1 = off.
    c.evals = ml_collections.ConfigDict()
    c.evals.samples = dict(type="grid", every=0, per_class=8, num_classes=10, cfg_scale=PICTURE_CFG_SCALE,
                           sampler="ddpm", respacing="250", vae="")  # WORKDIR/samples.png, WORKDIR/samples/step_*.png
    return c


def paper_config(model_name: str, image_size: int = 256) -> ml_collections.ConfigDict:
    """A paper model trained with the paper's recipe on SD-VAE latents of ImageNet (image_size / 8)."""
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (the VAE downsamples by 8), got {image_size}")
    c = base_config()
    c.model.name = model_name
    c.model.input_size = image_size // 8
    c.evals.samples.every = 10_000
    # FID-10K of the EMA model (ADM's five figures as fid10k_cfg1.5, ...), the paper's 250 DDPM steps and
    # guidance 1.5: off until a reference batch is given, --config.evals.fid.reference=VIRTUAL_imagenet256_labeled.npz
    # (512: VIRTUAL_imagenet512.npz); the Inception weights are fetched by name unless inception_weights is set.
    c.evals.fid = dict(type="fid", every=50_000, num_samples=10_000, cfg_scale=FID_CFG_SCALE, sampler="ddpm",
                       respacing="250", reference="", inception_weights="", vae="", per_device_batch=32, seed=0)
    return c
