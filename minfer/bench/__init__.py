"""Benchmarks: commands that report, never tests that assert. The protocol (methods interleaved, medians,
ratios within one run, JSON with the machine next to the numbers): docs/measuring.md."""
