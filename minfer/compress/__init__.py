"""Compression beyond quantization, trained on the CPU in minutes: distillation (``teacher``, ``losses``,
``distill``), Medusa heads (``medusa``, ``selfdistill``), pruning (``prune``) on ``corpus``, and
``minfer quantize`` (``quantize_cli``). The commands: docs/compression.md.
"""
