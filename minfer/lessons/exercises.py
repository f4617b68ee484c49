"""The exercise catalogue: every exercise of the lessons, registered by importing its module.

``minfer.lessons.registry`` holds the record and the registry; each ``ex_*`` module registers
one lesson's exercises on import; this module imports them all, so ``get(name)`` knows every
exercise. How to add an exercise: docs/teaching.md.
"""
from minfer.lessons import ex_basics  # noqa: F401  lesson 01: rms_norm, top_p
from minfer.lessons import ex_foundations  # noqa: F401  lessons 02-03: kv.append, online softmax, intensity
from minfer.lessons import ex_attention  # noqa: F401  lesson 03: window mask, GQA attention, int8 KV
from minfer.lessons import ex_paged  # noqa: F401  lesson 04: paged attention
from minfer.lessons import ex_serving  # noqa: F401  lesson 05: serving metrics, continuous batching
from minfer.lessons import ex_metrics  # noqa: F401  lesson 05: TTFT and goodput from events, static batching
from minfer.lessons import ex_quant  # noqa: F401  lesson 06: weight-only quantization
from minfer.lessons import ex_spec  # noqa: F401  lesson 07: speculative decoding, lookahead's pool
from minfer.lessons import ex_compilers  # noqa: F401  lesson 08: fused qkv, buckets and padding, MBU
from minfer.lessons import ex_service  # noqa: F401  lesson 09: stop strings, routing, the cost of a token
from minfer.lessons import ex_compress  # noqa: F401  lesson 10: distillation, Medusa, pruning, KV eviction
from minfer.lessons import ex_parallel  # noqa: F401  lesson 11: TP shards and bytes, GPipe, KV hand-off
from minfer.lessons import ex_loops  # noqa: F401  cumulative exercises: whole loops on a model
from minfer.lessons.registry import Exercise, Inputs, get, names, register  # noqa: F401  (the registry's API)

__all__ = ["Exercise", "Inputs", "get", "names", "register"]
