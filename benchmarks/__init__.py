"""kbitprep's benchmarks against the reference, `peft.prepare_model_for_kbit_training`.

`python benchmarks/run.py` (what `make bench` runs) measures everything in one run and
writes BENCHMARKS.md at the repository root. One module per concern:

- `shapes`: the published model configs and the training model's config (data only);
- `variants`: the preparations compared, the reference first;
- `footprint`: prepared bytes of real model shapes, sized on the meta device;
- `real_model`: a materialised 4-bit model, to validate those sizes and time preparation;
- `training`: LoRA training of each variant in its own process (also its warnings);
- `capture`: recording the warnings and warning log lines a block of code emits;
- `machine`: the machine and package versions;
- `markdown`: rendering the results as BENCHMARKS.md.
"""
