"""The engine: requests, the scheduler, the model runner, the engine loop, the output processor
(``docs/architecture.md`` follows one request through these files, with a usage example)."""
from minfer.engine.llm_engine import LLMEngine, StepOutput, run_trace
from minfer.engine.request import Request, RequestStatus
from minfer.engine.runner import ModelRunner
from minfer.engine.scheduler import POLICIES, Scheduler, SchedulerConfig

__all__ = ["LLMEngine", "StepOutput", "run_trace", "ModelRunner", "Request", "RequestStatus",
           "Scheduler", "SchedulerConfig", "POLICIES"]
