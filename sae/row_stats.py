"""Row statistics of the trainer's statistics pass (mean, median row norm, the first batch) and the
outlier-row filter of the training loop.

The statistics pass reads the first `stats_tokens` rows of epoch 0's stream before step 0, the same
rows on every rank (sae/data.py, `stats_batches`), so every rank derives the same numbers from it:

    mean          [d_in] float64 sum / rows            per-token FVU's reference point
    median_norm   median_n ||x_n||  (exact, fp32)       the outlier threshold's unit
    first rows    the first `keep_rows` rows            global batch 0: the encoder init's data

The stream is shuffled over the whole store, so the median of its first 262,144 rows (the default)
is the store's median to sampling error (~0.3%); it is fixed for the run.

Outlier rows: `--max_norm_ratio R` skips rows with ||x|| > R * median_norm in every batch
(`keep_rows`). On SmolLM2-135M a few rows at position 1 (attention sinks) have norms 25-120x the
median and carry 67-77% of the variance: trained on, they take the MSE over; the normal rows are
what an interpretability user reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


class RowStatistics:
    """Collects the statistics above from batches passing through `observe`."""

    def __init__(self, d_in: int, keep_first: int = 0) -> None:
        self.d_in = d_in
        self.keep_first = keep_first
        self._sum = torch.zeros(d_in, dtype=torch.float64)
        self._norms: list[Tensor] = []
        self._first: list[Tensor] = []
        self.rows = 0

    def observe(self, batches: Iterable[Tensor]) -> Iterator[Tensor]:
        """Yield each batch [n, d_in] unchanged after recording it (chain it into another consumer)."""
        for batch in batches:
            self.add(batch)
            yield batch

    def add(self, batch: Tensor) -> None:
        """Record one batch [n, d_in] (CPU)."""
        if batch.ndim != 2 or batch.shape[1] != self.d_in:
            raise ValueError(f"expected rows [n, {self.d_in}]; got shape {tuple(batch.shape)}")
        x = batch.float()
        self._sum += x.double().sum(0)
        self._norms.append(x.norm(dim=-1))
        wanted = self.keep_first - sum(len(t) for t in self._first)
        if wanted > 0:
            self._first.append(batch[:wanted].clone())
        self.rows += len(batch)

    @property
    def mean(self) -> Tensor:
        """[d_in] float32: the mean row."""
        return (self._sum / max(self.rows, 1)).float()

    @property
    def median_norm(self) -> float:
        """The median row norm (exact; of the lower middle row for an even count, as torch.median)."""
        if not self.rows:
            raise ValueError("the statistics pass read no rows; the store is empty")
        return torch.cat(self._norms).median().item()

    @property
    def first_rows(self) -> Tensor:
        """The first `keep_first` rows read (fewer if the pass read fewer), [n, d_in] in the store dtype."""
        return torch.cat(self._first) if self._first else torch.empty(0, self.d_in)


def norm_limit(max_norm_ratio: float, median_norm: float) -> float | None:
    """The row-norm threshold of `--max_norm_ratio` (None: the filter is off, ratio 0)."""
    return max_norm_ratio * median_norm if max_norm_ratio > 0 else None


def keep_rows(x: Tensor, max_norm: float | None) -> tuple[Tensor, Tensor]:
    """The rows of x [B, d] to train on, and how many were skipped (int64 scalar on x's device).

    Rows with ||x_b|| > max_norm are skipped, and so are rows holding NaN/Inf (their norm compares
    false); max_norm None: none are. Selecting rows needs their
    count on the host: one sync per step (the trainer's NaN check syncs each step anyway). Raises
    RuntimeError when every row of the batch is over the limit.
    """
    if max_norm is None:
        return x, torch.zeros((), dtype=torch.int64, device=x.device)
    keep = x.float().norm(dim=-1) <= max_norm  # [B]
    kept = int(keep.sum())
    if kept == 0:
        raise RuntimeError(f"all {len(x)} rows of a batch have norms above --max_norm_ratio's limit "
                           f"{max_norm:.4g}; the store is unlike its first rows: check it, or raise or "
                           "disable (0) --max_norm_ratio")
    skipped = torch.tensor(len(x) - kept, dtype=torch.int64, device=x.device)
    return (x if kept == len(x) else x[keep]), skipped
