"""Compression and parallel decoding beyond quantization, trained here on the CPU in minutes.

Distillation (``teacher``, ``losses``, ``distill``), Medusa heads (``medusa``, ``selfdistill``),
structured pruning (``prune``) on the corpus split of ``corpus``, and the ``minfer quantize``
command (``quantize_cli``: it loads through ``minfer.loading``, which ``minfer.quant`` may not
import). The commands and what each makes: docs/compression.md.
"""
