"""Bundled presets: models/*.json (LLaMA shapes) and methods/*.yaml (training recipes)."""
