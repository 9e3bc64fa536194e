"""Evaluators: each module is one ``type`` of ``config.evals`` (big_vision style), run by the trainer or alone."""
