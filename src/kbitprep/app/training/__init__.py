"""A fine-tuning run: its inputs, its phases, the two step loops and the step hooks both call."""
