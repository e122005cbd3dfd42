"""Benchmarks of mtlfast against its peers (installed as ``mtlfast.bench``)."""
