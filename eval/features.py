"""Per-latent statistics over held-out rows: firing counts, density, max activation, top-k rows.

The SAE's output features come dense [n, d_sae] (backend `reference`) or as a `SparseCode`
(indices, values [n, K], padding slots hold 0); `active_entries` turns either into the active
(row, latent, value) triples, from which every per-latent figure is built:

    density_j        count_j / N, count_j = #{rows i : f_ij != 0}
    log10_density_j  log10(density_j + 1e-10)  (SAELens' epsilon: a latent that never fired reads -10)
    dead_fraction    #{j : count_j = 0} / d_sae, over the evaluated rows
    max_activation_j max_i f_ij
    top rows of j    the k rows with the largest f_ij > 0 (ties: the earlier row), kept as a running
                     [d_sae, k] table merged with each chunk: memory d_sae * k, whatever N.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saetron.kernels.sparse_code import SparseCode

DENSITY_EPS = 1e-10


def active_entries(features: Tensor | SparseCode) -> tuple[Tensor, Tensor, Tensor]:
    """(row [nnz], latent [nnz], value [nnz]) of every non-zero activation, rows in [0, n)."""
    if isinstance(features, SparseCode):
        values, indices = features.values.detach(), features.indices
        rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(values)
        on = values != 0
        return rows[on], indices[on], values[on]
    row, latent = features.detach().nonzero(as_tuple=True)
    return row, latent, features.detach()[row, latent]


class FeatureStats:
    """Running per-latent figures; `update(features, first_row)` per chunk, in row order."""

    def __init__(self, d_sae: int, top_k: int = 0) -> None:
        self.d_sae, self.top_k = d_sae, top_k
        self.counts = torch.zeros(d_sae, dtype=torch.int64)
        self.max_activation = torch.zeros(d_sae, dtype=torch.float32)
        self.rows = 0
        self.top_values = torch.full((d_sae, top_k), float("-inf"))  # [d_sae, k], descending per latent
        self.top_rows = torch.full((d_sae, top_k), -1, dtype=torch.int64)  # [d_sae, k] global row ids

    @torch.no_grad()
    def update(self, features: Tensor | SparseCode, first_row: int) -> Tensor:
        """Add a chunk whose first row has global id `first_row`; returns its L0 per row [n]."""
        n = features.values.shape[0] if isinstance(features, SparseCode) else features.shape[0]
        row, latent, value = (t.cpu() for t in active_entries(features))
        value = value.float()
        self.counts += torch.bincount(latent, minlength=self.d_sae)
        self.max_activation.scatter_reduce_(0, latent, value, reduce="amax")
        if self.top_k:
            self._merge_top(latent, value, row + first_row)
        self.rows += n
        return torch.bincount(row, minlength=n)

    def _merge_top(self, latent: Tensor, value: Tensor, row: Tensor) -> None:
        """Merge the chunk's (latent, value, row) into the [d_sae, k] table, largest values first."""
        beats = value > self.top_values[latent, -1]  # only entries that can enter a full table
        latent, value, row = latent[beats], value[beats], row[beats]
        if latent.numel() == 0:
            return
        touched = torch.unique(latent)
        old_values, old_rows = self.top_values[touched], self.top_rows[touched]  # [t, k]
        keep = old_rows >= 0
        all_latent = torch.cat([touched.unsqueeze(1).expand_as(old_rows)[keep], latent])
        all_value = torch.cat([old_values[keep], value])
        all_row = torch.cat([old_rows[keep], row])
        # group by latent, value descending, then row ascending: sort by the least key first, stably
        order = torch.argsort(all_row, stable=True)
        order = order[torch.argsort(all_value[order], descending=True, stable=True)]
        order = order[torch.argsort(all_latent[order], stable=True)]
        all_latent, all_value, all_row = all_latent[order], all_value[order], all_row[order]
        group_start = torch.searchsorted(all_latent, all_latent, side="left")
        rank = torch.arange(len(all_latent)) - group_start
        top = rank < self.top_k
        self.top_values[touched] = float("-inf")
        self.top_rows[touched] = -1
        self.top_values[all_latent[top], rank[top]] = all_value[top]
        self.top_rows[all_latent[top], rank[top]] = all_row[top]

    def density(self) -> Tensor:
        """[d_sae] float64 firing frequency over the rows seen."""
        return self.counts.double() / max(self.rows, 1)

    def log10_density(self) -> Tensor:
        return torch.log10(self.density() + DENSITY_EPS)

    def dead_fraction(self) -> float:
        return float((self.counts == 0).double().mean())

    def top_examples(self, latent: int) -> list[tuple[int, float]]:
        """[(global row, activation)] of latent, largest first (at most k)."""
        rows, values = self.top_rows[latent], self.top_values[latent]
        return [(int(r), float(v)) for r, v in zip(rows, values) if r >= 0]
