"""Benchmarks that print what they measured (and the fake upstream they share with the tests)."""
