"""``python -m dit_jax.reference_batch``: an ADM reference batch from any image folder or tfds split.

    python -m dit_jax.reference_batch --images /data/imagenet/train --image_size 256 --out VIRTUAL_mine256.npz
    python -m dit_jax.reference_batch --tfds_name imagenet2012 --tfds_split validation --out ref256.npz

The file is what ADM's ``VIRTUAL_imagenet256_labeled.npz`` is, for your data: ``mu, sigma``
(pool_3, 2048) and ``mu_s, sigma_s`` (the sFID features, 2023) over **every** image, and
``arr_0``, a fixed random subset of ``--keep_images`` (10,000) of them as uint8 ``[N, S, S, 3]``
for precision/recall (``arr_1``: their labels; ``metadata``: JSON of the settings, the image count
and every skipped file).
Images get ADM's centre crop (``dit_jax.images``) and go through the FID InceptionV3
(``dit_jax.fid.inception``). ``python -m dit_jax.evaluate --reference OUT`` reads it.

It streams: only the float64 running sums (about 64 MB) and two batches of crops (one being
decoded) are in memory; the kept images go to block files on disk. Every ``--save_every`` batches the sums and the
position are written atomically to ``OUT.partial/``, so a killed run resumes where it was by
rerunning the same command; a rerun with other settings is refused, naming them. Bad images
are skipped and named (never fatal); fewer than 2 readable images is an error.
"""

from __future__ import annotations

import jax
from absl import app, flags

from dit_jax import console, images, locking, reference_builder, sharding
from dit_jax.fid import features, inception


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    images.define_source_flags()
    flags.adopt_module_key_flags(images)  # --help lists only this module's key flags: the source's are among them
    flags.DEFINE_string("out", None, "the reference batch .npz to write (its progress: OUT.partial/)",
                        required=True)
    flags.DEFINE_integer("image_size", 256, "ADM centre crop size (256 or 512 for ImageNet, as the samples)")
    flags.DEFINE_integer("keep_images", reference_builder.KEEP_IMAGES, "images stored in arr_0 for precision/recall "
                         "(a seeded random subset); the statistics use every image")
    flags.DEFINE_integer("seed", 0, "seed of the arr_0 subset")
    flags.DEFINE_string("inception_weights", None, "the FID InceptionV3 weights: pytorch-fid's or torch-fidelity's "
                        f".pth, a .safetensors conversion, or a registry name (default {inception.DEFAULT_WEIGHTS}); "
                        "random:SEED = random weights, for smoke tests only")
    flags.DEFINE_integer("batch_size", 256, "images read, cropped and sent through the network together")
    flags.DEFINE_integer("save_every", 20, "save the progress every this many batches")
    sharding.define_distributed_flags()


def main(argv: list[str]) -> None:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    images.check_source_flags()
    sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    try:
        reference_builder.check_settings(image_size=f.image_size, keep_images=f.keep_images,
                                         batch_size=f.batch_size, save_every=f.save_every, workers=f.workers)
        source = images.source_from_flags()
        weights = features.read_weights(f.inception_weights)  # a wrong file is named before any image is read
        summary = reference_builder.build(
            source, f.out, inception.create_feature_fn(inception.create_inception(weights.tensors)),
            image_size=f.image_size, keep_images=f.keep_images, seed=f.seed, batch_size=f.batch_size,
            save_every=f.save_every, workers=f.workers,
            settings={**features.weight_record(weights),
                      "devices": jax.device_count()})  # the network's batch and its last bits
    except (ValueError, OSError, locking.LockHeldError) as err:  # the user's to fix
        console.fail(str(err))
    except FloatingPointError as err:  # the run failed (features not finite)
        console.fail(str(err), 1)
    if not sharding.is_main_process():
        return
    for note in summary.get("notes", []):
        print(f"note: {note}")
    if summary.get("complete_already"):
        print(f"{summary['out']} is complete (same settings); nothing to do")
    else:
        print(f"wrote {summary['out']}: statistics of {summary['num_images']} images, {summary['num_kept']} in arr_0, "
              f"{summary['num_skipped']} skipped")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
