"""Evaluation: tasks, rule-based scorers, k-shot and best-of-n."""
