"""Preference pairs made from a model's own samples (MMPR's recipes), judged by the eval scorers."""
