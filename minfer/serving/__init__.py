"""Serving: many requests, one model. Scheduler policies, the engine loop, metrics, workloads.

    from minfer.serving import LLMEngine
    engine = LLMEngine.from_model(llm.model, llm.tokenizer, policy="continuous")
    engine.add_request("Hello", SamplingParams(temperature=0, max_tokens=16))
    while engine.has_unfinished_requests():
        for delta in engine.step():          # streaming: new tokens/text per request
            print(delta.request_id, delta.new_text)

- ``request``    Request (tokens, num_computed_tokens, its own generator, timestamps)
- ``scheduler``  static / dynamic / continuous policies, token budget, chunked prefill, preemption
- ``engine``     LLMEngine (add_request / step / abort), ModelRunner, run_trace (online replay)
- ``metrics``    TTFT, TPOT, ITL, E2E, percentiles, throughput, goodput (vLLM's definitions)
- ``workload``   seeded traces: Poisson / gamma arrivals, synthetic and real-text prompts
- ``batch_job``  ``minfer batch INPUT.jsonl OUTPUT.jsonl`` (OpenAI batch file format)
"""
from minfer.serving.engine import LLMEngine, ModelRunner, StepOutput, run_trace
from minfer.serving.metrics import RequestStats, ServingMetrics, summarize
from minfer.serving.request import Request, RequestStatus
from minfer.serving.scheduler import POLICIES, Scheduler, SchedulerConfig

__all__ = ["LLMEngine", "ModelRunner", "StepOutput", "run_trace", "Request", "RequestStatus",
           "Scheduler", "SchedulerConfig", "POLICIES", "RequestStats", "ServingMetrics", "summarize"]
