"""Benchmarks: `python -m bench [--quick] [NAME ...]` runs them and prints a table each."""
