"""Command modules define their flags only when run as programs, so any of them import together."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from absl import flags

import dit_jax


def command_modules() -> list[str]:
    """Every ``dit_jax`` module (packages included) that can run as ``python -m``."""
    names = []
    for info in pkgutil.walk_packages(dit_jax.__path__, "dit_jax."):
        spec = importlib.util.find_spec(info.name)
        if spec.origin and Path(spec.origin).read_text().count('if __name__ == "__main__":'):
            names.append(info.name)
    return names


def test_all_command_modules_import_together_without_defining_flags():
    names = command_modules()
    assert {"dit_jax.main", "dit_jax.parity", "dit_jax.model_stats", "dit_jax.benchmark"} <= set(names)
    for name in names:
        importlib.import_module(name)
    # absl keeps an empty list for a module whose flags were deleted again (tests/test_docs.py does).
    defined = {m: [f.name for f in fs] for m, fs in flags.FLAGS.flags_by_module_dict().items()
               if m.startswith("dit_jax") and fs}
    assert defined == {}, f"flags defined at import time: {defined}"


@pytest.mark.parametrize("command", ["dit_jax.reference_batch", "dit_jax.extract_latents"])
def test_help_shows_the_image_source_flags(command):
    """absl's --help lists the main module's key flags only: the source flags (defined in dit_jax.images) are
    adopted as key flags of each command that reads images."""
    proc = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    for flag in ("--images", "--tfds_name", "--tfds_split", "--tfds_data_dir", "--tfds_manual_dir", "--workers",
                 "--out"):
        assert f"  {flag}:" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
