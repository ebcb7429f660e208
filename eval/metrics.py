"""Reconstruction metrics of an SAE on held-out rows, accumulated chunk by chunk in bounded memory.

Two passes over the same rows x_i [d_in] (N rows, sums in float64, x̂_i the SAE's reconstruction):

    pass 1, `RowStats`:  mu = (1/N) sum_i x_i, every ||x_i|| (4 bytes a row) -> median_norm
    pass 2, `ReconstructionMetrics` (and 4 bytes a row for the per-token FVU):

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
    total = sum_sq / n - float((sum_x.double() / n).pow(2).sum())
    mse = residual / n
    if total < 1e-10:
        return 1.0 if mse < 1e-10 else 0.0
    return 1.0 - mse / total


class RowStats:
    """Pass 1: the mean row and every row's norm, for the per-token FVU and the typical-row cut.
    Sums stay on the rows' device (float64); only the norms [n] go to the host per chunk."""

    def __init__(self, d_in: int) -> None:
        self.d_in = d_in
        self.sum_x: Tensor | None = None  # [d_in] float64
        self.norms: list[Tensor] = []

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """x [n, d_in]."""
        x64 = x.detach().double()
        self.sum_x = x64.sum(0) if self.sum_x is None else self.sum_x + x64.sum(0)
        self.norms.append(x64.norm(dim=-1).float().cpu())

    @property
    def rows(self) -> int:
        return sum(len(n) for n in self.norms)

    def mean(self) -> Tensor:
        """mu [d_in] float64 (on the rows' device)."""
        return self.sum_x / max(self.rows, 1) if self.sum_x is not None else torch.zeros(self.d_in).double()

    def median_norm(self) -> float:
        return float(np.median(torch.cat(self.norms).numpy())) if self.norms else float("nan")


class ReconstructionMetrics:
    """Pass 2: sums over (x, x̂, L0 per row) chunks; `compute()` gives the JSON-ready figures.
    The sums stay on the device of the rows (float64): no host round trip per chunk but the
    per-token FVU [n] and L0 counts."""

    # columns of `sums`, for all rows (row 0) and the typical rows (row 1)
    SQ, RESID, ROWS, COSSIM, L2_RATIO, DOT, RECON_SQ = range(7)

    def __init__(self, d_in: int, d_sae: int, mean: Tensor, norm_cut: float) -> None:
        self.d_in, self.d_sae = d_in, d_sae
        self.mean = mean.double()  # [d_in], from RowStats
        self.norm_cut = norm_cut
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.int64)  # rows with L0 = 0..d_sae
        self.fvu_per_token: list[Tensor] = []
        self.sums = torch.zeros(2, 7, dtype=torch.float64, device=mean.device)
        self.sum_x = torch.zeros(2, d_in, dtype=torch.float64, device=mean.device)  # of all, typical rows

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, l0: Tensor) -> None:
        """x, x_hat [n, d_in] (input units, on mean's device), l0 [n] active latents per row."""
        x64, r64 = x.detach().double(), x_hat.detach().double()
        resid = (x64 - r64).pow(2).sum(-1)  # [n]
        sq = x64.pow(2).sum(-1)  # [n]
        dot = (x64 * r64).sum(-1)  # [n]
        norm_x, norm_r = sq.sqrt(), r64.norm(dim=-1)  # [n]
        safe_x = torch.where(norm_x < TINY_NORM, torch.ones_like(norm_x), norm_x)
        safe_r = torch.where(norm_r < TINY_NORM, torch.ones_like(norm_r), norm_r)
        per_row = torch.stack([sq, resid, torch.ones_like(sq), dot / (safe_x * safe_r), norm_r / safe_x, dot,
                               norm_r.pow(2)], dim=1)  # [n, 7]
        typical = (norm_x < self.norm_cut).double()  # [n]
        self.sums += torch.stack([per_row.sum(0), typical @ per_row])
        self.sum_x += torch.stack([x64.sum(0), typical @ x64])
        centered = (x64 - self.mean).pow(2).sum(-1)  # [n]
        self.fvu_per_token.append((resid / centered.clamp_min(1e-30)).float().cpu())
        self.l0_counts += torch.bincount(l0.detach().cpu().long(), minlength=self.d_sae + 1)

    def compute(self) -> dict:
        """The figures of the module docstring (plain floats and lists)."""
        sums, sum_x = self.sums.cpu(), self.sum_x.cpu()
        n, n_t = int(sums[0, self.ROWS]), int(sums[1, self.ROWS])
        total = sums[0].tolist()
        ev = pooled_explained_variance(sum_x[0], total[self.SQ], total[self.RESID], n)
        ev_t = pooled_explained_variance(sum_x[1], float(sums[1, self.SQ]), float(sums[1, self.RESID]), n_t)
        fvu = torch.cat(self.fvu_per_token).numpy() if self.fvu_per_token else np.zeros(0, np.float32)
        l0_values = torch.arange(self.d_sae + 1, dtype=torch.float64)
        top = int(self.l0_counts.nonzero().max()) if n else 0
        per = max(n, 1)
        return {
            "tokens": n,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "fvu_per_token_quantiles": {str(q): float(np.quantile(fvu, q)) for q in FVU_QUANTILES}
            if n else {},
            "mse": total[self.RESID] / per,
            "mse_per_element": total[self.RESID] / per / self.d_in,
            "cossim": total[self.COSSIM] / per,
            "l2_ratio": total[self.L2_RATIO] / per,
            "relative_reconstruction_bias": total[self.RECON_SQ] / total[self.DOT] if total[self.DOT]
            else float("nan"),
            "l0": float((self.l0_counts.double() * l0_values).sum()) / per,
            "l0_histogram": self.l0_counts[: top + 1].tolist(),
            "typical_tokens": n_t,
            "explained_variance_typical": ev_t,
            "fvu_typical": 1.0 - ev_t,
        }
