"""A clean clone: the Makefile's targets read only the repository, and `make demo` installs the runtime only."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tests.torch_references import REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[1]


def make_commands(target: str, tmp_path: Path) -> list[list[str]]:
    """The commands ``make TARGET`` would run with its venv not yet made (``make -n``: nothing runs)."""
    proc = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def installed_requirements(commands: list[list[str]]) -> set[str]:
    """The requirement files the pip commands among ``commands`` install."""
    return {c[i + 1] for c in commands if "pip" in c for i, arg in enumerate(c[:-1]) if arg == "-r"}


def test_the_reference_vectors_travel_with_the_repository(tmp_path):
    assert REFERENCE_DIR.is_relative_to(ROOT) and (REFERENCE_DIR / "README.md").is_file()
    parity = next(c for c in make_commands("parity", tmp_path) if "dit_jax.parity" in c)
    reference = (ROOT / parity[-1]).resolve()
    assert reference.is_relative_to(ROOT) and reference.is_file(), parity


def test_make_demo_installs_the_runtime_and_make_test_the_test_stack(tmp_path):
    demo = make_commands("demo", tmp_path)
    assert installed_requirements(demo) == {"requirements.txt"}
    assert any("dit_jax.main" in c for c in demo)
    test = make_commands("test", tmp_path)
    assert installed_requirements(test) == {"requirements.txt", "requirements-test.txt", "requirements-nodeps.txt"}
    # PyTorch and diffusers (the parity references) come with the test stack only.
    runtime = (ROOT / "requirements.txt").read_text()
    assert "torch" not in runtime and "diffusers" not in runtime
