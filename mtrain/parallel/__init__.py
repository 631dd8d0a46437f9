"""Rank layout (pure math), process groups and point-to-point helpers."""
