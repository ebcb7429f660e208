"""Training metrics: window averages over all ranks, dead latents, feature density, the log line.

Per step every rank adds its batch's numbers to on-device sums (no host sync); at a log step one
all-reduce turns the window into global values:
    loss, mse, l1, l0     mean over the window's steps and ranks (each rank's batch is the same size,
                          so this is the mean over the global batches)
    explained_variance    pooled over the window: 1 - sum ||x - x_hat||^2 / sum ||x - mean_window(x)||^2
    explained_variance_normal   the same over the rows with ||x|| <= 10 x the statistics pass's median
                          row norm (losses.normal_rows): a few huge rows cannot decide it
    median_fvu            median over the window's tokens (all ranks) of the per-token FVU
                          ||x - x_hat||^2 / ||x - mean||^2 (losses.per_token_fvu, mean = the statistics
                          pass's mean), read from an on-device histogram of FVU_BINS log-spaced bins over
                          [1e-6, 1e4]: within 0.3% of the exact median (bins 0.56% wide, the value is
                          the bin's geometric centre); 1e-6 when below, inf when above 1e4
    skipped_rows          rows the --max_norm_ratio filter skipped in the window, all ranks
    dead_fraction         latents that fired on no rank in the last `dead_window` tokens: the SAE's own
                          count (sae/dead_latents.py, the same on every rank; AuxK's candidates)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from saetron.kernels.sparse_code import SparseCode

from .dead_latents import DeadLatents
from .distributed import all_reduce
from .losses import firing_counts, normal_rows, per_token_fvu

METRIC_KEYS = ("step", "loss", "mse", "l1", "l0", "explained_variance", "explained_variance_normal",
               "median_fvu", "skipped_rows", "dead_fraction", "tokens_per_s", "lr")
OPTIONAL_KEYS = ("sparsity_coeff",)  # with --target_l0: the sparsity coefficient in effect (train.py adds it)
DENSITY_EPS = 1e-10  # SAELens' epsilon in log10(density + eps), so a never-firing latent reads -10
# The median-FVU histogram: FVU_BINS log-spaced bins over [FVU_MIN, FVU_MAX] plus an under- and an
# overflow bin; 10 decades / 4096 bins = 0.56% per bin.
FVU_MIN, FVU_MAX, FVU_BINS = 1e-6, 1e4, 4096


class Metrics:
    """Window sums, dead-latent counters and the density window of one rank."""

    def __init__(self, d_sae: int, d_in: int, batch_size: int, dead_latents: DeadLatents,
                 density_from_step: int, device: torch.device, *, mean: Tensor, median_norm: float) -> None:
        """`dead_latents`: the model's (sae.architecture.dead_latents); `mean` [d_in] and `median_norm`:
        the statistics pass's (row_stats.RowStatistics)."""
        self.batch_size = batch_size
        self.dead_latents = dead_latents
        self.density_from_step = density_from_step
        self.density_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self._sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, mse, l1, l0
        self._ev = torch.zeros(2, 3 + d_in, dtype=torch.float64, device=device)  # all / normal rows:
        # res, sum x^2, rows, sum x
        self.mean = mean.to(device, torch.float32)
        self.median_norm = median_norm
        self._fvu_bounds = torch.logspace(math.log10(FVU_MIN), math.log10(FVU_MAX), FVU_BINS + 1,
                                          dtype=torch.float64, device=device)  # [FVU_BINS + 1]
        self._fvu_counts = torch.zeros(FVU_BINS + 2, dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._steps = 0

    @torch.no_grad()
    def update(self, step: int, loss: Tensor, loss_dict: dict[str, Tensor], x: Tensor,
               reconstructed: Tensor, features: Tensor | SparseCode, skipped: Tensor | None = None) -> None:
        """Add step `step`'s batch (this rank's part): x, reconstructed [b, d_in], features [b, d_sae],
        and the number of rows the outlier filter skipped from it (int64 scalar). No host sync."""
        self._sums += torch.stack([loss.detach(), loss_dict["mse"].detach(), loss_dict["l1"].detach(),
                                   loss_dict["l0"]]).double()
        # Row terms in fp32 (one pass each over the batch), the window's sums in fp64: a row's sum over
        # d_in in fp32 is within ~1e-6 relative, far below what the logged figures show.
        x32 = x.reshape(reconstructed.shape).float()  # [b, d_in]
        res = (x32 - reconstructed.detach().float()).pow(2).sum(-1)  # [b]
        w = torch.stack([torch.ones_like(res), normal_rows(x32, self.median_norm).float()])  # [2, b]
        w64 = w.double()
        self._ev[:, 0] += w64 @ res.double()
        self._ev[:, 1] += w64 @ x32.pow(2).sum(-1).double()
        self._ev[:, 2] += w64.sum(1)
        self._ev[:, 3:] += (w @ x32).double()  # [2, d_in]
        fvu = per_token_fvu(x32, reconstructed, self.mean, residual=res).double()  # [b]
        bins = torch.bucketize(fvu, self._fvu_bounds)  # [b] in [0, FVU_BINS + 1]; NaN -> overflow
        self._fvu_counts.index_add_(0, bins, torch.ones_like(bins))  # bincount would sync on CUDA
        if skipped is not None:
            self._skipped += skipped
        if step >= self.density_from_step:
            self.density_counts += firing_counts(features, len(self.density_counts))  # [d_sae]
        self._steps += 1

    @torch.no_grad()
    def compute(self, steps_done: int, lr: float, seconds: float) -> dict:
        """Collective: the window's global metrics (keys METRIC_KEYS); starts a new window."""
        world = dist.get_world_size()
        sums = all_reduce(self._sums.clone()) / (self._steps * world)
        ev = all_reduce(self._ev.clone())  # [2, 3 + d_in]
        res, sum_sq, rows, sum_x = ev[:, 0], ev[:, 1], ev[:, 2], ev[:, 3:]
        total = (sum_sq - sum_x.pow(2).sum(-1) / rows.clamp_min(1)).clamp_min(torch.finfo(torch.float64).tiny)
        explained = torch.where(rows > 0, 1 - res / total, math.nan)  # [2]: all rows, normal rows
        dead = self.dead_latents.fraction()
        out = {"step": steps_done, "loss": sums[0].item(), "mse": sums[1].item(), "l1": sums[2].item(),
               "l0": sums[3].item(), "explained_variance": explained[0].item(),
               "explained_variance_normal": explained[1].item(), "median_fvu": self._median_fvu(),
               "skipped_rows": int(all_reduce(self._skipped.clone()).item()),
               "dead_fraction": dead.item(), "lr": lr,
               "tokens_per_s": self._steps * self.batch_size / max(seconds, 1e-9)}
        self._sums.zero_()
        self._ev.zero_()
        self._fvu_counts.zero_()
        self._skipped.zero_()
        self._steps = 0
        return out

    def _median_fvu(self) -> float:
        """Collective: the window's median per-token FVU from the all-reduced histogram (see above)."""
        counts = all_reduce(self._fvu_counts.clone())
        cum = counts.cumsum(0)
        if cum[-1].item() == 0:
            return math.nan
        i = int(torch.searchsorted(cum, (cum[-1] + 1) // 2).item())  # the bin of the lower median
        if i == 0:
            return FVU_MIN  # an upper bound: the median is below it
        if i > FVU_BINS:
            return math.inf
        return math.sqrt(self._fvu_bounds[i - 1].item() * self._fvu_bounds[i].item())

    def state_dict(self) -> dict:
        """Collective: the counters as identical tensors on every rank (for a checkpoint)."""
        return {"tokens_since_fired": self.dead_latents.tokens_since_fired.clone(),
                "density_counts": all_reduce(self.density_counts.clone()),
                "density_from_step": self.density_from_step}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Restore what state_dict saved at `step` (the global density sum goes to rank 0 only)."""
        self.dead_latents.restore(state["tokens_since_fired"])
        self.density_counts.zero_()
        if state["density_from_step"] == self.density_from_step:
            if dist.get_rank() == 0:
                self.density_counts.copy_(state["density_counts"])
        else:  # the run's length changed: the saved counts cover another window; start it afresh
            self.density_from_step = max(self.density_from_step, step)

    def log_density(self, steps_done: int) -> Tensor:
        """Collective: log10 of each latent's firing frequency over the density window, [d_sae] fp32 CPU."""
        counts = all_reduce(self.density_counts.clone()).double()
        tokens = max(steps_done - self.density_from_step, 1) * self.batch_size
        return torch.log10(counts / tokens + DENSITY_EPS).float().cpu()


def format_line(m: dict) -> str:
    """One fixed-width line: `step     420 | loss    0.2310 | ... | ev  0.930 | ev_normal  0.612 | ...`."""
    return (f"step {m['step']:>7d} | loss {m['loss']:9.4g} | mse {m['mse']:9.4g} | l1 {m['l1']:9.4g} | "
            f"l0 {m['l0']:7.1f} | ev {m['explained_variance']:6.3f} | "
            f"ev_normal {m['explained_variance_normal']:6.3f} | median_fvu {m['median_fvu']:6.3f} | "
            f"skipped {m['skipped_rows']:>5d} | dead {100 * m['dead_fraction']:5.1f}% | lr {m['lr']:.2e} | "
            f"tok/s {m['tokens_per_s']:>11,.0f}"
            + (f" | coeff {m['sparsity_coeff']:.3g}" if "sparsity_coeff" in m else ""))


class MetricsFile:
    """metrics.jsonl on rank 0: one JSON object per log step, in step order.

    `resume_step` None starts the file afresh. A resumed run passes its checkpoint's step: the records
    up to it are kept and the later ones dropped (the run logs those steps again), as is a last line
    cut short by a kill, so no step appears twice and every line parses.
    """

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # cut short: nothing after it was written
                    break
                if not isinstance(record, dict) or not isinstance(record.get("step"), int) \
                        or record["step"] > resume_step:
                    break
                kept.append(line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)

    def write(self, m: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: m[k] for k in METRIC_KEYS + OPTIONAL_KEYS if k in m}) + "\n")

    def last(self) -> dict:
        """The last record written (an empty dict if none)."""
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return json.loads(lines[-1]) if lines else {}
