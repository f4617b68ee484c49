"""Moved to ``minfer/engine`` (the engine loop is ``minfer/engine/llm_engine.py``); kept so old imports work."""
from minfer.engine import LLMEngine, ModelRunner, StepOutput, run_trace

__all__ = ["LLMEngine", "ModelRunner", "StepOutput", "run_trace"]
