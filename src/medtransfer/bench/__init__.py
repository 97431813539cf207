"""Benchmark grid: run store, statistics and reports comparing initialisations across tasks and label fractions."""
