"""Evaluation: metrics per benchmark and zero-shot."""
