"""Benchmarks: `make bench-refscore`, `make bench-trainer`; results in bench/results/*.json."""
