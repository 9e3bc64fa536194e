"""The persistent compilation cache: a second process reads what the first compiled; "off" writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One jitted program compiled in a fresh process; prints how many programs came from the cache.
PROGRAM = """
import sys, jax, jax.numpy as jnp
from dit_jax import compilation_cache
print(compilation_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None, min_compile_seconds=0))
jax.jit(lambda x: jnp.sin(x) @ x.T + 1).lower(jnp.ones((64, 64))).compile()
print(compilation_cache.hits())
"""


def run(tmp_path: Path, *args: str) -> list[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_a_second_process_reads_the_cache_of_the_first(tmp_path):
    default = tmp_path / "xdg" / "dit_jax" / "jax_cache"
    assert run(tmp_path) == [str(default), "0"]
    assert os.listdir(default)  # the compiled program was written
    directory, hits = run(tmp_path)
    assert directory == str(default) and int(hits) >= 1  # read back, not compiled again (the ones() too)
    other = tmp_path / "elsewhere"
    assert run(tmp_path, str(other)) == [str(other), "0"] and os.listdir(other)


def test_off_writes_nothing(tmp_path):
    for off in ("off", ""):
        assert run(tmp_path, off) == ["None", "0"]
    assert not (tmp_path / "xdg").exists()
