"""Benchmarks: every `tidelog bench` figure, each beside its floor from the same run."""
