"""Performance measurements behind ``python -m dit_jax.benchmark`` and ``python -m dit_jax.sweep``: timings
of our programs with FLOPs and MFU (``measure``), PyTorch's (``torch_reference``) and the two side by side
(``side_by_side``, ``report``), the sweep's plan and runs (``plan``, ``runner``), and a saved profile's
time split (``trace``, ``time_split``); ``timing`` times calls."""
