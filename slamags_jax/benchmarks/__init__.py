"""Benchmark modes of ``python -m slamags_jax.bench`` that live in their own modules."""
