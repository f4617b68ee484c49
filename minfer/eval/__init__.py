"""Quality evaluations.

- ``perplexity``: sliding-window perplexity on a fixed text that ships with
  Python (a slice of the CPython reference docs in ``pydoc_data.topics``), so
  every machine can measure what a change (quantization, a KV-cache format)
  costs in quality without downloading a data set. ``minfer eval perplexity``.
"""
from minfer.eval.perplexity import PerplexityResult, perplexity, reference_text

__all__ = ["perplexity", "reference_text", "PerplexityResult"]
