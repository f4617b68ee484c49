"""Benchmarks: commands that report, never tests that assert.

Protocol (DESIGN.md): methods run interleaved (A, B, A, B, ...) after a
warm-up, each figure is the median over repeats, and speedups are ratios
measured within the same run. Results are written as JSON with the machine,
torch version, device, dtype and model next to the numbers.
"""
