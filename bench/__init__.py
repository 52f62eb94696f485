"""Benchmarks of the running service: `python -m bench.ingest` (what `make bench` runs)."""
