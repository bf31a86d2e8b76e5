"""Benchmarks of runjobs (not tests): run `python -m bench` from the repo root."""
