"""Helpers the tests and the benchmarks share that are not tests themselves."""
