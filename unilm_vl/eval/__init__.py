"""Benchmarks: one runnable module per benchmark; metrics.py holds the pure metric functions."""
