"""Vision pretraining: train a small vision tower on labelled objects before a VLM uses it."""
