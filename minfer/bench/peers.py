"""Peer engines on the same weights: transformers (rebuilt from minfer's config and state dict, eager or
``StaticCompiledHF``) and llama.cpp; imported lazily, minfer never needs them (docs/measuring.md)."""
import time

import torch

from minfer.bench.timing import rates


def hf_model(cfg, state_dict, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
    """An HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Gemma3ForCausalLM`` holding the given weights."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - dev extra
        raise RuntimeError("comparing with transformers needs `pip install -e .[dev]`") from e
    d = cfg.to_hf()
    arch = d.pop("architectures")[0]
    conf_cls = {"Qwen2ForCausalLM": transformers.Qwen2Config,
                "Gemma3ForCausalLM": transformers.Gemma3TextConfig}.get(arch, transformers.LlamaConfig)
    hc = conf_cls(**d)
    hc._attn_implementation = attn_implementation
    m = getattr(transformers, arch)(hc)
    missing, unexpected = m.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the HF model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        m.tie_weights()
    return m.to(device=device, dtype=dtype).eval()


class StepClock:
    """A transformers streamer that records when each generated step arrives (bench decode, bench serve)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def hf_generate_timed(model, prompt_ids: list[int], max_new_tokens: int, **kw) -> tuple[dict, list[int]]:
    """Greedy generate exactly `max_new_tokens` tokens (``kw``: more ``generate`` options) -> (TTFT and
    decode tok/s from token timestamps, ``timing.rates``; the tokens)."""
    ids = torch.tensor([prompt_ids], device=model.device)
    clock = StepClock()
    t0 = time.perf_counter()
    # No EOS at all (rather than min_new_tokens, which would *suppress* EOS and change the
    # greedy choice): exactly what minfer's ignore_eos does.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, streamer=clock, eos_token_id=None, pad_token_id=0, **kw)
    # the first put() is the prompt itself, the second the first new token
    return rates(t0, clock.times[1:]), out[0, ids.shape[1]:].tolist()


class StaticCompiledHF:
    """transformers ``generate`` with ``cache_implementation="static"`` and its decode step compiled.

    The peer of minfer's ``LLM(compile=True)``. ``warm_up`` times compile + one run apart
    (``warmup_s``) and raises ``RuntimeError`` naming the reason when the step cannot compile.
    How it is set up on a CPU: docs/measuring.md.
    """

    def __init__(self, model):
        try:
            from transformers import CompileConfig
        except ImportError as e:
            raise RuntimeError("transformers-compiled needs a transformers version with CompileConfig "
                               "(>= 4.48): pip install -U transformers") from e
        self.model = model
        self.compile_config = CompileConfig()
        if model.device.type == "cpu":
            self.compile_config._compile_all_devices = True
        self.warmup_s: float | None = None

    def _generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[dict, list[int]]:
        return hf_generate_timed(self.model, prompt_ids, max_new_tokens, cache_implementation="static",
                                 compile_config=self.compile_config)

    def warm_up(self, prompt_ids: list[int], max_new_tokens: int) -> float:
        """One untimed ``generate`` that compiles the decode step; returns its wall time in seconds."""
        t0 = time.perf_counter()
        try:
            self._generate(prompt_ids, max_new_tokens)
        except Exception as e:    # inductor/dynamo errors come in many types; name the cause and stop
            raise RuntimeError(f"transformers could not compile its static-cache decode step here: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        self.warmup_s = time.perf_counter() - t0
        if getattr(self.model, "_compiled_call", None) is None:
            raise RuntimeError("transformers ran generate with the static cache but did not compile the "
                               "decode step (its auto-compile criteria were not met on this device)")
        return self.warmup_s

    def timed(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[dict, list[int]]:
        """Like ``hf_generate_timed``, on the compiled static-cache path (call ``warm_up`` first)."""
        if self.warmup_s is None:
            raise RuntimeError("call warm_up() first: the first call compiles and is not a timing")
        return self._generate(prompt_ids, max_new_tokens)


def find_gguf(model: str):
    """The GGUF file of a model: ``model`` itself when it is one, else the first .gguf in its
    folder (minfer keeps the original file there, ``weights/README.md``); None when there is none."""
    from minfer.checkpoints import resolve_model
    try:
        path = resolve_model(model, fetch_if_missing=False)
    except (OSError, ValueError):
        return None
    return path if path.suffix == ".gguf" else next(iter(sorted(path.glob("*.gguf"))), None)


class LlamaCppPeer:
    """llama.cpp through ``llama-cpp-python`` on a GGUF file: greedy, exactly ``n`` tokens, EOS ignored.

    ``generate`` yields tokens one by one (its own eval + sample loop); ``reset()`` first, so every
    run prefills the whole prompt as minfer's runs do. The same thread count as torch's.
    """

    def __init__(self, gguf, threads: int, n_ctx: int):
        try:
            import llama_cpp
        except ImportError as e:
            raise RuntimeError("llama-cpp-python is not installed (pip install llama-cpp-python; "
                               "docs/benchmarks.md gives the build flags)") from e
        self.gguf = gguf
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=n_ctx, n_batch=512, verbose=False)

    def timed(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[dict, list[int]]:
        self.llm.reset()
        tokens, times = [], []
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            tokens.append(int(tok))
            if len(tokens) == max_new_tokens:
                break
        return rates(t0, times), tokens
