"""Comparing a BF16 baseline model with its FP4 versions (``fp4fmt eval``)."""
