"""A fine-tuning run: its phases, the Trainer glue, divergence, evaluation, sampling, progress."""
