"""The memory model: a training step on the meta device, the simulated loss, live bytes, the fit search."""
