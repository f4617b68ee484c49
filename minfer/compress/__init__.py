"""Compression and parallel decoding beyond quantization, trained here on the CPU in minutes.

    corpus.py    the training / held-out split (standard-library sources; pydoc topics never trained on)
    teacher.py   teacher-signal cache: SmolLM2's top-k log-probs + final hidden states, sharded, resumable
    losses.py    distillation loss: KL at temperature T over top-k bins + one "rest" bin, plus CE
    distill.py   a small Llama student trained on the cache (a draft model for speculative decoding)
    medusa.py    Medusa heads on the frozen last hidden state; tree candidates verified in one forward
    prune.py     structured pruning of FFN channels / attention heads, healed by distillation

KV-cache eviction (StreamingLLM, H2O, SnapKV) is a cache: ``minfer/kv/evict.py``. What these
methods buy is measured in ``minfer/bench`` (``minfer prune``, ``minfer medusa cost``,
``minfer bench evict``).

Commands: ``minfer teacher-cache``, ``minfer distill``, ``minfer medusa train | selfdistill``, and
``minfer quantize`` (``quantize_cli.py``: it loads through ``minfer.loading``, which ``minfer.quant`` may not import).
"""
