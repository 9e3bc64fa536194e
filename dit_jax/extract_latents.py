"""Pre-encode images into SD-VAE latents: ``python -m dit_jax.extract_latents``.

Every image is ADM-centre-cropped, then it and its horizontal flip are encoded; the
posterior mean and std (not one fixed sample) are stored in float16/bfloat16 ArrayRecord
shards (format: ``dit_jax.latents``). The work is split by shard over hosts and each batch
over the host's local devices. A shard is written under a temporary name, renamed (for a
``gs://`` --out: written locally, then uploaded as one object), then
its ``.json`` report (with its size and SHA-256) is written: a killed run resumes at the
first shard without a report, and a finished folder is left as it is, except that any
shard found damaged (size; with ``--verify`` SHA-256) is set aside and encoded again. The
plan (settings, VAE weights' hash, encoding batch and devices) must match to resume, and
``--out`` is locked (``dit_jax.locking``). Bad images are skipped and listed, never fatal;
a run that encodes no image at all fails (one line, status 1); a user error (a missing folder,
a bad VAE or number, other settings than the folder's, a busy folder) is one line, status 2.

    python -m dit_jax.extract_latents --images=/data/imagenet/train --out=/data/latents256 \\
        --vae=stabilityai/sd-vae-ft-ema --resolution=256
"""

from __future__ import annotations

from absl import app, flags

from dit_jax import console, images, latent_extraction, latents, locking, sharding
from dit_jax import vae as vae_lib


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    images.define_source_flags()
    flags.adopt_module_key_flags(images)  # --help lists only this module's key flags: the source's are among them
    flags.DEFINE_string("out", None, "output folder for the shards and metadata.json (resumed if it exists)")
    flags.DEFINE_string("vae", vae_lib.HUB_VAES[0], "diffusers VAE folder (config.json + weights) or hub id "
                        f"({' or '.join(vae_lib.HUB_VAES)})")
    flags.DEFINE_integer("resolution", 256, "image size; latents are resolution / 8")
    flags.DEFINE_enum("dtype", "float16", sorted(latents.STORAGE_DTYPES), "storage dtype of mean and std")
    flags.DEFINE_integer("images_per_shard", 10_000, "images per ArrayRecord shard (the unit of resumption)")
    flags.DEFINE_integer("batch_size", 64, "images per encoder call on this host (x2 with the flips)")
    flags.DEFINE_bool("verify", False, "check every finished shard's SHA-256 (not only its size) and encode "
                      "damaged shards again")
    # Multi-process (as for dit_jax.main): Slurm, Open MPI and Cloud TPU pods are detected; elsewhere run the
    # same command on every host with these. Each process encodes its share of the shards.
    sharding.define_distributed_flags()


def main(argv: list[str]) -> None:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    images.check_source_flags()
    if not f.out:
        raise app.UsageError("give --out (the output folder)")
    try:
        latent_extraction.check_settings(resolution=f.resolution, images_per_shard=f.images_per_shard,
                                         batch_size=f.batch_size, workers=f.workers)
        sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
        source = images.source_from_flags()
        model = vae_lib.load_vae(f.vae)
        latent_extraction.extract(source, model, f.out, vae=f.vae, resolution=f.resolution, dtype=f.dtype,
                                  images_per_shard=f.images_per_shard, batch_size=f.batch_size, workers=f.workers,
                                  verify=f.verify)
    except (ValueError, OSError, locking.LockHeldError) as err:  # the user's to fix: one line, status 2
        console.fail(str(err))
    except RuntimeError as err:  # nothing could be encoded: one line, status 1
        console.fail(str(err), 1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
