"""``python -m dit_jax.main`` at its edges: the help, a misspelt config field, an unusable or refused workdir."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import main_command

ROOT = Path(__file__).resolve().parents[1]


def run_main(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_help_lists_the_config_files_and_groups():
    proc = run_main([sys.executable, "-m", "dit_jax.main", "--help"])
    text = " ".join(proc.stdout.split())  # absl wraps the help (and exits with status 1)
    assert text, proc.stderr[-2000:]
    assert "configs/default.py" in text and "dit_xl2_256.py" in text and "dit_jax/recipes.py" in text
    assert "--config.GROUP.FIELD=VALUE" in text
    for group in ("model: ", "train: ", "data: ", "diffusion: ", "evals: ", "mesh: "):
        assert group in text
    assert "train: batch_size, checkpoint_atomicity" in text


@pytest.mark.parametrize("flag, line", [
    ("--config.train.stpes=3", "error: --config.train.stpes: the config has no field 'stpes'; did you mean "
                               "--config.train.steps? (see dit_jax/recipes.py for every field and its meaning)"),
    ("--config.trian.steps=3", "error: --config.trian.steps: the config has no field 'trian'; did you mean "
                               "--config.train.steps? (see dit_jax/recipes.py for every field and its meaning)"),
])
def test_a_misspelt_config_field_is_one_clean_line_with_the_suggestion(tmp_path, flag, line):
    proc = run_main(main_command(tmp_path / "run", flag))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == line and proc.stderr.count("error:") == 1
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_one_line_and_status_2(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run_main(main_command(tmp_path / "file"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'file'} is a file, not a folder (or a path "
                                                    "through a file): give a folder")


def test_a_start_refused_after_the_lock_names_its_config_in_one_line_and_leaves_no_workdir(tmp_path):
    """The console names the config file and the overrides in one line (every field goes to the workdir's
    config.json once the run starts). The latents source is checked after the workdir is locked (and so made):
    it is removed again, with no config.json."""
    workdir = tmp_path / "runs" / "x"
    proc = run_main(main_command(workdir, "--config.data.source=latents", "--config.train.steps=7"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: data.latents_dir is empty")
    assert list(tmp_path.iterdir()) == []
    lines = proc.stderr.splitlines()
    config_lines = [i for i, line in enumerate(lines) if "] config: " in line]
    assert len(config_lines) == 1, proc.stderr[-3000:]
    assert lines[config_lines[0]].endswith("] config: configs/default.py --config.data.source=latents "
                                           f"--config.train.steps=7 (every field: {workdir / 'config.json'})")
    # Log lines and the error only: no listing of the config's fields follows (``train:``, ...).
    assert all(re.match(r"[IWEF]\d{4} ", line) or line.startswith("error: ") for line in lines), proc.stderr[-3000:]
