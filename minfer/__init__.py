"""minfer: a small, readable PyTorch engine that teaches how LLM inference is made fast.

Public API (names as in vLLM)::

    from minfer import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    print(llm.generate("Once upon a time", SamplingParams(max_tokens=32))[0].text)
"""
from minfer.config import ModelConfig
from minfer.sampling import SamplingParams

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
