"""The exercise catalogue: every exercise of the lessons, registered by importing its module.

``minfer.lessons.registry`` holds the record and the registry; each ``ex_*`` module registers
one lesson's exercises on import (``ex_loops``: the cumulative ones, whole loops on a model); this
module imports them all, so ``get(name)`` knows every exercise. How to add one: docs/teaching.md.
"""
from minfer.lessons import (ex_attention, ex_basics, ex_compilers, ex_compress, ex_foundations,  # noqa: F401
                            ex_loops, ex_metrics, ex_paged, ex_parallel, ex_quant, ex_service, ex_serving,
                            ex_spec)
from minfer.lessons.registry import Exercise, Inputs, get, names, register  # noqa: F401  (the registry's API)

__all__ = ["Exercise", "Inputs", "get", "names", "register"]
