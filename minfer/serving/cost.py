"""The cost of a token: measured throughput -> dollars and kilowatt-hours per million tokens.

    $ per million tokens = P / (3600 r) * 1e6;   kWh per million tokens = (W / 1000) * (1e6 / r) / 3600

Defaults (``--price-per-hour``, ``--watts``) and why batching halves the price: docs/serving.md.
"""
DEFAULT_PRICE_PER_HOUR = 0.10
DEFAULT_WATTS = 700.0


def _check(tokens_per_s: float, name: str, value: float) -> None:
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def dollars_per_mtok(tokens_per_s: float, price_per_hour: float) -> float:
    """$ per million tokens for a machine at ``price_per_hour`` making ``tokens_per_s``."""
    _check(tokens_per_s, "price_per_hour", price_per_hour)
    return price_per_hour / (3600.0 * tokens_per_s) * 1e6


def kwh_per_mtok(tokens_per_s: float, watts: float) -> float:
    """kWh per million tokens for a machine drawing ``watts`` while making ``tokens_per_s``."""
    _check(tokens_per_s, "watts", watts)
    return watts / 1000.0 * (1e6 / tokens_per_s) / 3600.0


def cost_rows(throughputs: dict[str, float], price_per_hour: float, watts: float) -> list[dict]:
    """One row per run: output tok/s, $/Mtok, kWh/Mtok, and each run's cost relative to the cheapest."""
    rows = [{"run": name, "output_tok_s": r, "usd_per_mtok": dollars_per_mtok(r, price_per_hour),
             "kwh_per_mtok": kwh_per_mtok(r, watts)} for name, r in throughputs.items()]
    cheapest = min(r["usd_per_mtok"] for r in rows) if rows else 0.0
    for r in rows:
        r["x_cheapest"] = r["usd_per_mtok"] / cheapest if cheapest else float("nan")
    return rows
