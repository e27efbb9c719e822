"""Benchmarks of image-search: ``python -m benchmarks.run [--quick] [--out DIR] [CASE ...]``."""
