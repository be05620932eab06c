"""Run settings: each finetune option declared once (the CLI, the checks, resume, report.json, the docs)."""
