"""The engine: requests, the scheduler, the model runner, the engine loop, the output processor.

    engine = LLMEngine.from_model(llm.model, llm.tokenizer)
    engine.add_request("Hello", SamplingParams(temperature=0, max_tokens=16))
    while engine.has_unfinished_requests():
        for delta in engine.step():          # streaming: new tokens/text per request
            print(delta.request_id, delta.new_text)

``docs/architecture.md`` follows one request through these files.
"""
from minfer.engine.llm_engine import LLMEngine, StepOutput, run_trace
from minfer.engine.request import Request, RequestStatus
from minfer.engine.runner import ModelRunner
from minfer.engine.scheduler import POLICIES, Scheduler, SchedulerConfig

__all__ = ["LLMEngine", "StepOutput", "run_trace", "ModelRunner", "Request", "RequestStatus",
           "Scheduler", "SchedulerConfig", "POLICIES"]
