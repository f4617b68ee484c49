"""Small helpers every compression command shares (no heavy imports)."""
import json
import math
import sys
import time

DEFAULT_CACHE = "weights/teacher-cache"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lr_at(progress: float, base: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to ``floor * base``."""
    if progress < warmup:
        return base * max(progress, 1e-3) / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def fit(module, step_loss, evaluate, *, steps: int | None, minutes: float | None, lr: float, eval_every: int,
        log=print, on_eval=None, clip: float | None = None, **adamw) -> list[dict]:
    """AdamW on ``module``, ``lr_at``'s schedule, until ``steps`` steps or ``minutes`` pass. ``step_loss()``
    -> a batch's loss; ``evaluate(step, seconds, train_loss)`` -> a curve row (or None), at the start, every
    ``eval_every`` steps and at the end; ``on_eval(module, curve)`` after each row."""
    import torch
    module.train().requires_grad_(True)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, **adamw)
    curve: list[dict] = []
    t0, step, running = time.perf_counter(), 0, None

    def progress() -> float:
        elapsed = (time.perf_counter() - t0) / (60 * minutes) if minutes else 0.0
        return max(step / steps if steps else 0.0, elapsed)

    def checkpoint() -> None:
        module.eval()
        row = evaluate(step, round(time.perf_counter() - t0, 1), running)
        if row is not None:
            curve.append(row)
            log(json.dumps(row))
            if on_eval is not None:
                on_eval(module, curve)
        module.train()

    checkpoint()
    while progress() < 1.0:
        loss = step_loss()
        for g in opt.param_groups:
            g["lr"] = lr_at(progress(), lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        step += 1
        running = float(loss.detach()) if running is None else 0.9 * running + 0.1 * float(loss.detach())
        if step % eval_every == 0:
            checkpoint()
    if not curve or curve[-1]["step"] != step:
        checkpoint()
    module.eval().requires_grad_(False)
    return curve
