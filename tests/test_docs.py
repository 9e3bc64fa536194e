"""The command lines in README.md and docs/*.md name only flags that their commands define.

Every ``python -m dit_jax.X ...`` (and ``launch/babysit.sh|run.sh ... -- X ...``) in a code block
or an inline code span is read; each ``--flag`` after it must be one of ``X``'s flags (its
``_define_flags()``, collected from the global absl registry and removed again) or absl's own, and
each ``--config.a.b=v`` must name a field of the config file the line gives (anywhere else: a field
of some config in ``configs/``). No JAX program is compiled.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from functools import cache
from pathlib import Path

from absl import flags
from ml_collections import ConfigDict

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A command: `python -m dit_jax.X` (any python, e.g. .venv/bin/python) or a launch/ script's `-- X`.
COMMAND = re.compile(r"python[\w./]*\s+-m\s+dit_jax\.([\w.]+)|launch/(?:babysit|run)\.sh\b[^`|;&#]*?\s--\s+([\w.]+)")
# Where a shell command ends: a pipe, a list operator, a comment, a redirection of stderr.
COMMAND_END = re.compile(r"\|\||&&|[|;`]|\s#|\s\d?>")
FLAG = re.compile(r"(?:^|[\s\[])--([A-Za-z_][\w.]*)")
CONFIG_OVERRIDE = re.compile(r"--config\.([\w.]+)")
CONFIG_FILE = re.compile(r"--config[=\s]+(configs/\w+\.py)")
# Flags every absl program has (app.run's help flags and the parser's own).
ABSL_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok"}


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.M | re.S)


def markdown_commands(text: str) -> list[str]:
    """The shell text of each command line: fenced code blocks (``\\`` continuations joined) and
    inline code spans of the prose (a span may wrap over lines within a paragraph)."""
    code = "\n".join(re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, flags=re.M | re.S))
    logical = re.sub(r"\\\n\s*", " ", code).splitlines()
    spans = [span for paragraph in re.split(r"\n\s*\n", prose(text))
             for span in re.findall(r"`([^`]+)`", re.sub(r"\s*\n\s*", " ", paragraph))]
    commands = []
    for line in logical + spans:
        starts = list(COMMAND.finditer(line))
        for i, match in enumerate(starts):
            stop = starts[i + 1].start() if i + 1 < len(starts) else len(line)
            rest = line[match.end():stop]
            end = COMMAND_END.search(rest)
            commands.append(match.group(0) + (rest[:end.start()] if end else rest))
    return commands


@cache
def command_flags(module: str) -> dict[str, flags.Flag]:
    """The flags ``python -m dit_jax.<module>`` defines, by name: its ``_define_flags()`` run on the
    global registry, whose new names are read and deleted again."""
    mod = importlib.import_module(f"dit_jax.{module}")
    before = set(flags.FLAGS)
    try:
        mod._define_flags()
        return {name: flags.FLAGS[name] for name in set(flags.FLAGS) - before}
    finally:
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)


@cache
def absl_flags() -> frozenset[str]:
    """absl's flags, valid for every command (``--verbosity`` etc.)."""
    by_module = flags.FLAGS.flags_by_module_dict()
    return frozenset(ABSL_FLAGS | {f.name for m, fs in by_module.items() if m.startswith("absl.") for f in fs})


@cache
def load_config(path: str) -> ConfigDict:
    """``get_config()`` of a config file (relative to the repository)."""
    spec = importlib.util.spec_from_file_location(f"_docs_config_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def has_field(config: ConfigDict, path: str) -> bool:
    node = config
    for part in path.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def config_field_problem(path: str, config_file: str | None) -> str | None:
    """Why ``--config.<path>`` is wrong for ``config_file`` (None: for every file in ``configs/``), or None."""
    if config_file and not (ROOT / config_file).is_file():
        return f"--config {config_file}: no such file"
    files = [config_file] if config_file else sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py")
                                                     if p.name != "__init__.py")
    if any(has_field(load_config(f), path) for f in files):
        return None
    return f"--config.{path}: no such field in {config_file or 'any of configs/*.py'}"


def command_problems(command: str) -> list[str]:
    """What is wrong with one command line: an unknown command, flag or config field."""
    match = COMMAND.match(command)
    module = match.group(1) or match.group(2)
    if importlib.util.find_spec(f"dit_jax.{module}") is None:
        return [f"{command!r}: no module dit_jax.{module}"]
    mod = importlib.import_module(f"dit_jax.{module}")
    if not hasattr(mod, "_define_flags"):
        return [f"{command!r}: dit_jax.{module} is not a command (no _define_flags)"]
    defined = command_flags(module)
    config_file = CONFIG_FILE.search(command)
    problems = []
    for name in FLAG.findall(command[match.end():]):
        head, _, field = name.partition(".")
        flag = defined.get(head)
        if field:
            if flag is None or not type(flag).__module__.startswith("ml_collections"):
                problems.append(f"{command!r}: --{name}: dit_jax.{module} has no config flag --{head}")
            elif problem := config_field_problem(field, config_file and config_file.group(1)):
                problems.append(f"{command!r}: {problem}")
        elif not (flag is not None or head in absl_flags()
                  or (head.startswith("no") and isinstance(defined.get(head[2:]), flags.BooleanFlag))):
            problems.append(f"{command!r}: dit_jax.{module} has no flag --{name}")
    return problems


def markdown_problems(text: str) -> list[str]:
    """Every problem of a markdown text's command lines, and of any ``--config.a.b`` it names outside them."""
    commands = markdown_commands(text)
    problems = [p for command in commands for p in command_problems(command)]
    in_commands = "\n".join(commands)
    for path in set(CONFIG_OVERRIDE.findall(text)):
        if f"--config.{path}" not in in_commands and (problem := config_field_problem(path, None)):
            problems.append(problem)
    return problems


def test_every_documented_command_line_names_existing_flags():
    problems = {str(f.relative_to(ROOT)): markdown_problems(f.read_text()) for f in DOC_FILES}
    assert {f: p for f, p in problems.items() if p} == {}


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", prose(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def broken_links(text: str, page: Path) -> list[str]:
    """The relative links of a page's text (at ``page``) whose file, or heading after ``#``, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(f"{page.relative_to(ROOT)}: {target}")
    return broken


def test_every_relative_link_leads_to_a_file_and_heading():
    assert [b for page in DOC_FILES for b in broken_links(page.read_text(), page)] == []


def test_the_docs_show_every_command():
    """The check above reads real command lines: each command of the package appears in one."""
    shown = {(m.group(1) or m.group(2)) for f in DOC_FILES for c in markdown_commands(f.read_text())
             for m in [COMMAND.match(c)]}
    assert {"main", "sample", "evaluate", "reference_batch", "extract_latents", "export", "parity",
            "model_stats", "benchmark", "sweep"} <= shown


def test_made_up_flags_and_fields_are_caught():
    text = """
Run it:

```bash
python -m dit_jax.sample --ckpt DiT-XL-2-256x256.pt --cfg_scale 4 --no_such_flag=1 | tee log  # --not_this
python -m dit_jax.main --config configs/default.py --workdir w \\
    --config.train.steps=5 --config.train.no_such_field=3 --config.evals.no_such_eval.every=1
launch/babysit.sh --name=x -- main --config configs/dit_xl2_256.py --workdir w --config.no_such_section.a=1
python -m dit_jax.no_such_command --x
```

In prose, `python -m dit_jax.export --ckpt=runs/a --out=b.pt --fromat=diffusers` and a bare
`--config.data.no_such_field=2`; `python -m dit_jax.extract_latents --noverify --images=d --out=o` is fine.
"""
    commands = markdown_commands(text)
    assert len(commands) == 6
    assert not markdown_problems("`python -m dit_jax.extract_latents --noverify --images=d --out=o`")
    problems = markdown_problems(text)
    expected = ["dit_jax.sample has no flag --no_such_flag", "--config.train.no_such_field: no such field",
                "--config.evals.no_such_eval.every: no such field in configs/default.py",
                "--config.no_such_section.a: no such field in configs/dit_xl2_256.py",
                "no module dit_jax.no_such_command", "dit_jax.export has no flag --fromat",
                "--config.data.no_such_field: no such field in any of configs/*.py"]
    # One problem each, and none else (--ckpt, --config.train.steps, the comment's --not_this, --noverify).
    assert sorted(e for e in expected for p in problems if e in p) == sorted(expected)
    assert len(problems) == len(expected)


def test_broken_links_are_caught():
    text = ("[a](docs/training.md#fine-tune) [b](docs/nope.md) [c](docs/training.md#no-such-heading) "
            "[d](https://example.com/x) [e](#dit_jax) [f](#nowhere)\n```\n[g](not/checked.md)\n```\n")
    assert broken_links(text, ROOT / "README.md") == [
        "README.md: docs/nope.md", "README.md: docs/training.md#no-such-heading", "README.md: #nowhere"]
