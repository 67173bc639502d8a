"""Latency benchmark of the real-size model with random weights (see bench/README.md)."""
