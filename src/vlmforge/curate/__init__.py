"""Data curation: scoring, filtering, dedup, mixing of caption shards."""
