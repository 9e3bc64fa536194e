"""JAX's persistent compilation cache: compiled programs kept on disk, so a second launch skips XLA's compile.

Every command that compiles big programs (``main``, ``benchmark``, ``sample``, ``evaluate``, ``sweep``)
defines ``--compilation_cache`` with ``define_flag`` and calls ``enable`` with it before its first
compile. The default folder is ``$XDG_CACHE_HOME/dit_jax/jax_cache`` (``~/.cache/dit_jax/jax_cache``);
``off`` (or an empty value) disables it. Entries are keyed by the program, the backend and jax's
version, so a stale entry is never used; only programs that took ``MIN_COMPILE_SECONDS`` to compile
are written (the small helper programs are cheaper to recompile than to read).
"""

from __future__ import annotations

import os

import jax

MIN_COMPILE_SECONDS = 1.0
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = [0]  # programs read from the cache in this process (jax's monitoring event)


def _count_hit(event: str, **kwargs: object) -> None:
    if event == _HIT_EVENT:
        _hits[0] += 1


jax.monitoring.register_event_listener(_count_hit)


def hits() -> int:
    """How many compiled programs this process has read from the persistent cache so far."""
    return _hits[0]


def default_dir() -> str:
    """``$XDG_CACHE_HOME/dit_jax/jax_cache``, with ``~/.cache`` where XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dit_jax", "jax_cache")


def enable(directory: str | None, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> str | None:
    """Point jax's persistent compilation cache at ``directory`` (``None``: ``default_dir()``; ``"off"`` or
    ``""``: disable it); returns the folder in use, or None when off. Call before the first compile."""
    if directory is not None and directory.strip().lower() in ("", "off"):
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = directory or default_dir()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def define_flag() -> None:
    """``--compilation_cache``, for every command that compiles big programs."""
    from absl import flags

    flags.DEFINE_string("compilation_cache", None, "Folder of jax's persistent compilation cache (a second launch "
                        "skips compiling); default $XDG_CACHE_HOME/dit_jax/jax_cache; 'off' disables it.")
