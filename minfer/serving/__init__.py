"""Serving: the outside world around the engine (``minfer/engine``): metrics, workloads, batch jobs.

- ``metrics``    TTFT, TPOT, ITL, E2E, percentiles, throughput, goodput (vLLM's definitions)
- ``workload``   seeded traces: Poisson / gamma arrivals, synthetic and real-text prompts
- ``batch_job``  ``minfer batch INPUT.jsonl OUTPUT.jsonl`` (OpenAI batch file format)
- ``fake``       a fake model runner and clock: the scheduler in milliseconds (tests, lesson 05)

The engine's names are re-exported here for the code that imports them from ``minfer.serving``.
"""
from minfer.engine import (POLICIES, LLMEngine, ModelRunner, Request, RequestStatus, Scheduler,
                           SchedulerConfig, StepOutput, run_trace)
from minfer.metrics import RequestStats
from minfer.serving.metrics import ServingMetrics, summarize

__all__ = ["LLMEngine", "ModelRunner", "StepOutput", "run_trace", "Request", "RequestStatus",
           "Scheduler", "SchedulerConfig", "POLICIES", "RequestStats", "ServingMetrics", "summarize"]
