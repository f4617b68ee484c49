"""The engine: requests, the scheduler, the model runner, the engine loop, the output processor.

    from minfer.engine import LLMEngine
    engine = LLMEngine.from_model(llm.model, llm.tokenizer)
    engine.add_request("Hello", SamplingParams(temperature=0, max_tokens=16))
    while engine.has_unfinished_requests():
        for delta in engine.step():          # streaming: new tokens/text per request
            print(delta.request_id, delta.new_text)

- ``request``     Request: tokens, num_computed_tokens, its own generator, timestamps
- ``scheduler``   static / dynamic / continuous policies, token budget, chunked prefill, preemption
- ``runner``      ModelRunner: the ONLY place a batch is flattened (ids, positions, slots, block tables)
- ``llm_engine``  LLMEngine (add_request / step / abort, n > 1 by forking), StepOutput, run_trace
- ``output``      TextOutput: incremental detokenizing, stop strings, what is safe to stream

``minfer.LLM`` is the front door (``minfer/llm.py``); ``docs/architecture.md`` follows one request
through these files.
"""
from minfer.engine.llm_engine import LLMEngine, StepOutput, run_trace
from minfer.engine.request import Request, RequestStatus
from minfer.engine.runner import ModelRunner
from minfer.engine.scheduler import POLICIES, Scheduler, SchedulerConfig

__all__ = ["LLMEngine", "StepOutput", "run_trace", "ModelRunner", "Request", "RequestStatus",
           "Scheduler", "SchedulerConfig", "POLICIES"]
