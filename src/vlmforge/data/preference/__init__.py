"""Preference pairs as training data: readers (MMPR jsonl, InternVL meta.json, synth pairs), a memory-mapped index, batches for MPO."""
