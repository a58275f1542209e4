"""The contract between model and data: what a model config means before any weights exist.

Special tokens, architecture presets, the projector classes (arch/projectors: each kind answers how
many visual tokens a patch grid gives), visual tokens per image and image preprocessing live here,
so the data layer expands `<image>` and preprocesses pixels exactly as the model expects without
importing the model.
"""
