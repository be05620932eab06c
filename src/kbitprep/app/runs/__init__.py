"""The run folder and what it keeps: lock, manifest, checkpoints, report.json, the loss plot."""
