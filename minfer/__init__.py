"""minfer: a small, readable PyTorch engine that teaches how LLM inference is made fast.

Public API (names as in vLLM)::

    from minfer import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    print(llm.generate("Once upon a time", SamplingParams(max_tokens=32))[0].text)
"""
import os

# 2 MB pages for CPU tensors of 2 MB or more (torch's allocator reads this at its first allocation, so
# it counts only when minfer is imported before torch allocates): a decode step streams every weight,
# and on 4 KB pages the TLB misses cost a fifth of the read rate (docs/measuring.md). "0": 4 KB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from minfer.config import ModelConfig  # noqa: E402
from minfer.sampling import SamplingParams  # noqa: E402

__version__ = "0.1.0"

_LAZY = {"LLM": "llm", "RequestOutput": "llm", "load_model": "loading",     # name -> minfer.<module>
         "Transformer": "model", "build_model": "model"}


def __getattr__(name):
    # Lazy: `import minfer` stays fast; the model stack loads on first use.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"minfer.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'minfer' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "ModelConfig", "RequestOutput", "load_model", "Transformer", "build_model"]
