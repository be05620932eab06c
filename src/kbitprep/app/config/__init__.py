"""Run settings: each finetune option declared once (CLI, checks, resume, report.json, docs, run files)."""
