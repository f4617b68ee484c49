"""The cost of a token: measured throughput -> dollars and kilowatt-hours per million tokens.

A machine rented at ``P`` dollars per hour that produces ``r`` output tokens per
second makes ``3600 r`` tokens an hour, so::

    $ per million tokens   = P / (3600 r) * 1e6
    kWh per million tokens = (W / 1000) * (1e6 / r) / 3600      (W watts drawn while it runs)

The machine costs the same per hour whether it is busy or not: a server that
answers one request at a time (online, held to a latency target) produces far
fewer tokens per hour than one that batches everything it has (offline,
throughput-bound), and each of its tokens costs that much more. That gap is
why batch APIs are sold at about half price.

Defaults used by ``minfer bench serve`` (stated in its output; change them with
``--price-per-hour`` and ``--watts``):

* ``DEFAULT_PRICE_PER_HOUR`` = $0.10/h: a 2-vCPU general-purpose cloud VM, on demand.
* ``DEFAULT_WATTS`` = 700 W: an H100 SXM's board power. The same figure for a year
  of running is 700 W x 8760 h = 6,132 kWh, about the 7,000 kWh a year often quoted
  once the host and cooling are counted. (A 2-core CPU VM draws far less; pass
  ``--watts`` for the machine you measured.)
"""
from __future__ import annotations

DEFAULT_PRICE_PER_HOUR = 0.10
DEFAULT_WATTS = 700.0
HOURS_PER_YEAR = 8760


def dollars_per_mtok(tokens_per_s: float, price_per_hour: float) -> float:
    """$ per million tokens for a machine at ``price_per_hour`` making ``tokens_per_s``."""
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
    if price_per_hour < 0:
        raise ValueError(f"price_per_hour must be >= 0, got {price_per_hour}")
    return price_per_hour / (3600.0 * tokens_per_s) * 1e6


def kwh_per_mtok(tokens_per_s: float, watts: float) -> float:
    """kWh per million tokens for a machine drawing ``watts`` while making ``tokens_per_s``."""
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
    if watts < 0:
        raise ValueError(f"watts must be >= 0, got {watts}")
    return watts / 1000.0 * (1e6 / tokens_per_s) / 3600.0


def cost_rows(throughputs: dict[str, float], price_per_hour: float, watts: float) -> list[dict]:
    """One row per run: output tok/s, $/Mtok, kWh/Mtok, and each run's cost relative to the cheapest."""
    rows = [{"run": name, "output_tok_s": r, "usd_per_mtok": dollars_per_mtok(r, price_per_hour),
             "kwh_per_mtok": kwh_per_mtok(r, watts)} for name, r in throughputs.items()]
    cheapest = min(r["usd_per_mtok"] for r in rows) if rows else 0.0
    for r in rows:
        r["x_cheapest"] = r["usd_per_mtok"] / cheapest if cheapest else float("nan")
    return rows
