"""Pretrained weights: the download registry (``fetch``), ``load_dit`` (``load``), diffusers names, fine-tuning, layouts."""
