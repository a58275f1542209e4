"""Run reports: metrics.jsonl -> PNG plots + HTML."""
