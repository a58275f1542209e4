"""The contract between model and data: what a model config means before any weights exist.

Special tokens, architecture presets, visual tokens per image and image preprocessing live here,
so the data layer expands `<image>` and preprocesses pixels exactly as the model expects without
importing the model.
"""
