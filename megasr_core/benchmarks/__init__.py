"""Benchmark commands: each prints one JSON object and never fails a test run."""
