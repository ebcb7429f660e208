"""The evaluation's PNG plots (matplotlib, Agg backend): feature density and L0 histograms."""

from __future__ import annotations

import io

import numpy as np

DENSITY_FLOOR = -10.0  # log10(0 + 1e-10): latents that never fired


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(6.4, 3.6), dpi=100)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def density_png(log10_density: np.ndarray, tokens: int) -> bytes:
    """Histogram of log10 feature density; never-firing latents in their own bar at -10."""
    plt, (fig, ax) = _figure()
    dead = log10_density <= DENSITY_FLOOR + 1e-6
    live = log10_density[~dead]
    lowest = np.log10(1.0 / max(tokens, 1))  # one firing in the evaluated tokens
    bins = np.linspace(min(lowest, live.min(initial=lowest)) - 0.25, 0.0, 41)
    ax.hist(live, bins=bins, color="#3b7dd8", label=f"live ({len(live)})")
    if dead.any():  # a bar of its own left of the axis' range, its tick labelled "never"
        never = bins[0] - 0.6
        n_dead = int(dead.sum())
        ax.bar([never], [n_dead], width=0.3, color="#c0392b", label=f"never fired ({n_dead})")
        ticks = [t for t in range(int(np.floor(bins[0])), 1) if t >= bins[0]]
        ax.set_xticks([never, *ticks], ["never", *map(str, ticks)])
    ax.set_xlabel(f"log10 feature density (over {tokens:,} tokens)")
    ax.set_ylabel("latents")
    ax.set_title("Feature density")
    ax.legend(frameon=False)
    return _png(plt, fig)


def l0_png(l0_histogram: list[int], mean_l0: float) -> bytes:
    """Histogram of active latents per token."""
    plt, (fig, ax) = _figure()
    counts = np.asarray(l0_histogram, dtype=np.float64)
    values = np.arange(len(counts))
    ax.bar(values, counts, width=1.0, color="#3b7dd8")
    ax.axvline(mean_l0, color="#c0392b", linestyle="--", label=f"mean {mean_l0:.1f}")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("tokens")
    ax.set_title("L0 per token")
    ax.legend(frameon=False)
    return _png(plt, fig)
