"""ADM's FID evaluator in JAX: the network (``inception``), the figures (``metrics``), its ``.npz``
files (``adm_npz``) and the features of a batch (``features``)."""
