"""The test suite (a regular package, so `tests.conftest` is ours even where an installed distribution, such as
torch-fidelity 0.4.0, ships a top-level `tests` package)."""
