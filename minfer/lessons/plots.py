"""Small matplotlib helpers shared by the lesson notebooks (examples: lessons/README.md); each draws on
an ``Axes`` the caller owns, so a notebook keeps control of layout and titles."""
from typing import Iterable, Sequence

import matplotlib.ticker as mticker
import numpy as np

UNITS = [(2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 3 * 2**30 -> '3.0 GiB' (binary units, as memory is sold)."""
    for size, unit in UNITS:
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    """131072 -> '128k', 1536 -> '1.5k', 48 -> '48' (token counts, powers of 1024)."""
    if n >= 1024:
        k = n / 1024
        return f"{k:.0f}k" if k == int(k) else f"{k:.1f}k"
    return f"{n:.0f}"


def bytes_axis(ax, axis: str = "y") -> None:
    """Label the ticks of ``axis`` ('x' or 'y') as byte sizes."""
    fmt = mticker.FuncFormatter(lambda v, _: human_bytes(v) if v > 0 else "0")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def context_axis(ax, ticks: Sequence[int], axis: str = "x") -> None:
    """Log-2 axis of context lengths with ticks like '1k', '8k', '128k'."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    a.set_major_locator(mticker.FixedLocator(list(ticks)))
    a.set_major_formatter(mticker.FuncFormatter(lambda v, _: human_count(v)))
    a.set_minor_locator(mticker.NullLocator())


def top_tokens(ax, labels: Sequence[str], probs: Sequence[float], title: str | None = None,
               color: str = "tab:blue") -> None:
    """Horizontal bars, most likely token on top, each labelled with its probability."""
    y = np.arange(len(labels))[::-1]
    ax.barh(y, probs, color=color)
    ax.set_yticks(y, [repr(s) for s in labels])
    for yi, p in zip(y, probs):
        ax.text(p, yi, f" {p:.3f}", va="center", fontsize=8, clip_on=True)
    ax.set(xlim=(0, max(max(probs) * 1.25, 1e-9)), xlabel="probability")
    if title:
        ax.set_title(title)


def roofline(ax, machines: Iterable[tuple[str, float, float]],
             workloads: dict[str, float] | None = None,
             measured: Iterable[tuple[str, float, float]] = (),
             intensity_range: tuple[float, float] = (0.1, 2000.0)) -> None:
    """The roofline model (Williams, Waterman & Patterson 2009) on log-log axes.

    machines: (label, bandwidth in bytes/s, peak FLOP/s), each drawn as min(peak, bandwidth * I) with
    its ridge point I* = peak / bandwidth; workloads: label -> arithmetic intensity (FLOP per byte),
    dashed vertical lines; measured: (label, intensity, achieved FLOP/s) points."""
    lo, hi = intensity_range
    intensity = np.logspace(np.log10(lo), np.log10(hi), 400)
    for i, (label, bw, peak) in enumerate(machines):
        color = f"C{i}"
        ax.plot(intensity, np.minimum(peak, bw * intensity), color=color, lw=2,
                label=f"{label}: {bw / 1e9:,.0f} GB/s, {_flops_label(peak)}")
        ridge = peak / bw
        if lo <= ridge <= hi:
            ax.plot([ridge], [peak], "o", color=color, ms=5)
            ax.annotate(f"ridge {ridge:.0f} FLOP/B", (ridge, peak), textcoords="offset points",
                        xytext=(4, -12), fontsize=8, color=color)
    for label, value in (workloads or {}).items():
        ax.axvline(value, color="gray", ls="--", lw=1)
        ax.annotate(label, (value, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=8, color="dimgray", xytext=(3, 0), textcoords="offset points")
    pts = list(measured)
    if pts:
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "k^", ms=6, label="measured (this CPU)")
        for label, x, y in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), xlabel="arithmetic intensity (FLOP per byte moved)",
           ylabel="attainable FLOP/s")
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(_flops_label))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _flops_label(v: float, _pos=None) -> str:
    for size, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if v >= size:
            return f"{v / size:.3g} {unit}FLOP/s"
    return f"{v:g} FLOP/s"
