"""Reconstruction metrics of an SAE on held-out rows, accumulated chunk by chunk in bounded memory.

Two passes over the same rows x_i [d_in] (N rows, sums in float64, x̂_i the SAE's reconstruction):

    pass 1, `RowStats`:  mu = (1/N) sum_i x_i, every ||x_i|| (4 bytes a row) -> median_norm
    pass 2, `ReconstructionMetrics`:

    explained_variance   1 - sum_i ||x_i - x̂_i||^2 / (sum_i ||x_i||^2 - ||sum_i x_i||^2 / N)
                         SAELens >= 6.45 (evals.ExplainedVarianceCalculator): pooled over all rows,
                         the total variance around the mean of all rows (not the per-batch mean of
                         per-token ratios that SAELens keeps as `explained_variance_legacy`)
    fvu                  1 - explained_variance
    fvu_per_token        ||x_i - x̂_i||^2 / ||x_i - mu||^2, reported as quantiles
    mse                  (1/N) sum_i ||x_i - x̂_i||^2: summed over d_in, mean over rows (SAELens 6.x's
                         `mse`); mse_per_element = mse / d_in
    cossim               (1/N) sum_i cos(x_i, x̂_i)
    l2_ratio             (1/N) sum_i ||x̂_i|| / ||x_i||
    relative_reconstruction_bias
                         sum_i ||x̂_i||^2 / sum_i <x_i, x̂_i>  (arXiv 2404.16014 eq. 10, as in
                         dictionary_learning and SAELens, pooled over all rows; 1 = no shrinkage)
    l0                   (1/N) sum_i #{j : f_ij != 0}, and its histogram
    explained_variance_typical, fvu_typical
                         the same over the "typical" rows, ||x_i|| < outlier_factor * median_norm
                         (attention-sink rows have norms 25-120x the median and dominate pooled sums)

Per-latent figures (density, dead fraction, top examples) are in `features.py`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FVU_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
TINY_NORM = 1e-4  # SAELens' guard: a row norm below it divides as 1 (cossim, l2_ratio)


def pooled_explained_variance(sum_x: Tensor, sum_sq: float, residual: float, n: int) -> float:
    """SAELens' EV from pooled sums: 1 - (residual / n) / (sum_sq / n - ||sum_x / n||^2).

    A constant input (zero variance) scores 1 when reconstructed exactly, else 0, as in SAELens.
    """
    if n == 0:
        return float("nan")
    total = sum_sq / n - float((sum_x / n).pow(2).sum())
    mse = residual / n
    if total < 1e-10:
        return 1.0 if mse < 1e-10 else 0.0
    return 1.0 - mse / total


class RowStats:
    """Pass 1: the mean row and every row's norm, for the per-token FVU and the typical-row cut."""

    def __init__(self, d_in: int) -> None:
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.norms: list[Tensor] = []

    def update(self, x: Tensor) -> None:
        """x [n, d_in]."""
        x64 = x.detach().to("cpu", torch.float64)
        self.sum_x += x64.sum(0)
        self.norms.append(x64.norm(dim=-1).float())

    @property
    def rows(self) -> int:
        return sum(len(n) for n in self.norms)

    def mean(self) -> Tensor:
        """mu [d_in] float64."""
        return self.sum_x / max(self.rows, 1)

    def median_norm(self) -> float:
        return float(np.median(torch.cat(self.norms).numpy())) if self.norms else float("nan")


class ReconstructionMetrics:
    """Pass 2: sums over (x, x̂, L0 per row) chunks; `compute()` gives the JSON-ready figures."""

    def __init__(self, d_in: int, d_sae: int, mean: Tensor, norm_cut: float) -> None:
        self.d_in, self.d_sae = d_in, d_sae
        self.mean = mean.to(torch.float64)  # [d_in], from RowStats
        self.norm_cut = norm_cut
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.int64)  # rows with L0 = 0..d_sae
        self.fvu_per_token: list[Tensor] = []
        # [all rows, typical rows] x (sum ||x||^2, sum ||x - x̂||^2, rows), and sum x of each
        self.sums = torch.zeros(2, 3, dtype=torch.float64)
        self.sum_x = torch.zeros(2, d_in, dtype=torch.float64)
        self.cossim = self.l2_ratio = self.dot = self.recon_sq = 0.0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, l0: Tensor) -> None:
        """x, x_hat [n, d_in] (input units), l0 [n] active latents per row."""
        x64, r64 = x.detach().to("cpu", torch.float64), x_hat.detach().to("cpu", torch.float64)
        resid = (x64 - r64).pow(2).sum(-1)  # [n]
        sq = x64.pow(2).sum(-1)  # [n]
        norm_x, norm_r = sq.sqrt(), r64.norm(dim=-1)  # [n]
        typical = norm_x < self.norm_cut  # [n]
        for k, rows in enumerate((torch.ones_like(typical), typical)):
            self.sums[k] += torch.stack([sq[rows].sum(), resid[rows].sum(), rows.sum().double()])
            self.sum_x[k] += x64[rows].sum(0)
        centered = (x64 - self.mean).pow(2).sum(-1)  # [n]
        self.fvu_per_token.append((resid / centered.clamp_min(1e-30)).float())
        safe_x = torch.where(norm_x < TINY_NORM, torch.ones_like(norm_x), norm_x)
        safe_r = torch.where(norm_r < TINY_NORM, torch.ones_like(norm_r), norm_r)
        self.cossim += float(((x64 * r64).sum(-1) / (safe_x * safe_r)).sum())
        self.l2_ratio += float((norm_r / safe_x).sum())
        self.dot += float((x64 * r64).sum())
        self.recon_sq += float(r64.pow(2).sum())
        self.l0_counts += torch.bincount(l0.detach().cpu().long(), minlength=self.d_sae + 1)

    def compute(self) -> dict:
        """The figures of the module docstring (plain floats and lists)."""
        (sq, resid, n), (sq_t, resid_t, n_t) = self.sums.tolist()
        n, n_t = int(n), int(n_t)
        ev = pooled_explained_variance(self.sum_x[0], sq, resid, n)
        ev_t = pooled_explained_variance(self.sum_x[1], sq_t, resid_t, n_t)
        fvu = torch.cat(self.fvu_per_token).numpy() if self.fvu_per_token else np.zeros(0, np.float32)
        l0_values = torch.arange(self.d_sae + 1, dtype=torch.float64)
        top = int(self.l0_counts.nonzero().max()) if n else 0
        return {
            "tokens": n,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "fvu_per_token_quantiles": {str(q): float(np.quantile(fvu, q)) for q in FVU_QUANTILES}
            if n else {},
            "mse": resid / max(n, 1),
            "mse_per_element": resid / max(n, 1) / self.d_in,
            "cossim": self.cossim / max(n, 1),
            "l2_ratio": self.l2_ratio / max(n, 1),
            "relative_reconstruction_bias": self.recon_sq / self.dot if self.dot else float("nan"),
            "l0": float((self.l0_counts.double() * l0_values).sum()) / max(n, 1),
            "l0_histogram": self.l0_counts[: top + 1].tolist(),
            "typical_tokens": n_t,
            "explained_variance_typical": ev_t,
            "fvu_typical": 1.0 - ev_t,
        }
