"""Serving: the outside world around the engine (``minfer/engine``): the server, the router, batch jobs,
metrics, workloads, a fake runner and clock (docs/serving.md). The engine's names are re-exported here.
"""
from minfer.engine import (POLICIES, LLMEngine, ModelRunner, Request, RequestStatus, Scheduler,
                           SchedulerConfig, StepOutput, run_trace)
from minfer.metrics import RequestStats
from minfer.serving.metrics import ServingMetrics, summarize

__all__ = ["LLMEngine", "ModelRunner", "StepOutput", "run_trace", "Request", "RequestStatus",
           "Scheduler", "SchedulerConfig", "POLICIES", "RequestStats", "ServingMetrics", "summarize"]
