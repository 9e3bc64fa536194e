"""Sampling: the in-jit chains and the sharded engine (``engine``), the resumable samples folder
(``blocks``), pixels and grids (``image_grid``)."""
