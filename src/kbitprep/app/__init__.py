"""The application around the preparation core: loading, data, the run folder, fine-tuning, the demo.

The core (`kbitprep.backends`, `plan`, `apply`, `checkpointing`, `verify`, `sizing`)
imports nothing from here; this package builds the `kbitprep` command's runs on top of it.
"""
