"""Quality evaluations: ``perplexity`` on a fixed text that ships with Python (``minfer eval perplexity``)."""
from minfer.eval.perplexity import PerplexityResult, perplexity, reference_text

__all__ = ["perplexity", "reference_text", "PerplexityResult"]
