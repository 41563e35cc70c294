"""Benchmarks of pyflannel's footprint: ``python -m bench.footprint --help``."""
