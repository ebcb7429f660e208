"""Training metrics: window averages over all ranks, dead latents, feature density, the log line.

Per step every rank adds its batch's numbers to on-device sums (no host sync); at a log step one
all-reduce turns the window into global values:
    loss, mse, l1, l0     mean over the window's steps and ranks (each rank's batch is the same size,
                          so this is the mean over the global batches)
    explained_variance    pooled over the window: 1 - sum ||x - x_hat||^2 / sum ||x - mean_window(x)||^2
    dead_fraction         latents that fired on no rank in the last `dead_window` tokens: the SAE's own
                          count (sae/dead_latents.py, the same on every rank; AuxK's candidates)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from saetron.kernels.sparse_code import SparseCode

from .dead_latents import DeadLatents
from .distributed import all_reduce
from .losses import firing_counts

METRIC_KEYS = ("step", "loss", "mse", "l1", "l0", "explained_variance", "dead_fraction", "tokens_per_s", "lr")
OPTIONAL_KEYS = ("sparsity_coeff",)  # with --target_l0: the sparsity coefficient in effect (train.py adds it)
DENSITY_EPS = 1e-10  # SAELens' epsilon in log10(density + eps), so a never-firing latent reads -10


class Metrics:
    """Window sums, dead-latent counters and the density window of one rank."""

    def __init__(self, d_sae: int, d_in: int, batch_size: int, dead_latents: DeadLatents,
                 density_from_step: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.dead_latents = dead_latents  # the model's (sae.architecture.dead_latents)
        self.density_from_step = density_from_step
        self.density_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self._sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, mse, l1, l0
        self._ev = torch.zeros(3 + d_in, dtype=torch.float64, device=device)  # res, sum x^2, rows, sum x
        self._steps = 0

    @torch.no_grad()
    def update(self, step: int, loss: Tensor, loss_dict: dict[str, Tensor], x: Tensor,
               reconstructed: Tensor, features: Tensor | SparseCode) -> None:
        """Add step `step`'s batch (this rank's part): x, reconstructed [b, d_in], features [b, d_sae]."""
        self._sums += torch.stack([loss.detach(), loss_dict["mse"].detach(), loss_dict["l1"].detach(),
                                   loss_dict["l0"]]).double()
        x64 = x.reshape(reconstructed.shape).double()  # [b, d_in]
        res = (x64 - reconstructed.detach().double()).pow(2).sum()
        self._ev[:3] += torch.stack([res, x64.pow(2).sum(), x64.new_tensor(float(x64.shape[0]))])
        self._ev[3:] += x64.sum(0)
        if step >= self.density_from_step:
            self.density_counts += firing_counts(features, len(self.density_counts))  # [d_sae]
        self._steps += 1

    @torch.no_grad()
    def compute(self, steps_done: int, lr: float, seconds: float) -> dict:
        """Collective: the window's global metrics (keys METRIC_KEYS); starts a new window."""
        world = dist.get_world_size()
        sums = all_reduce(self._sums.clone()) / (self._steps * world)
        ev = all_reduce(self._ev.clone())
        res, sum_sq, rows, sum_x = ev[0], ev[1], ev[2], ev[3:]
        total = (sum_sq - sum_x.pow(2).sum() / rows).clamp_min(torch.finfo(torch.float64).tiny)
        dead = self.dead_latents.fraction()
        out = {"step": steps_done, "loss": sums[0].item(), "mse": sums[1].item(), "l1": sums[2].item(),
               "l0": sums[3].item(), "explained_variance": (1 - res / total).item(),
               "dead_fraction": dead.item(), "lr": lr,
               "tokens_per_s": self._steps * self.batch_size / max(seconds, 1e-9)}
        self._sums.zero_()
        self._ev.zero_()
        self._steps = 0
        return out

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
    """One fixed-width line: `step     420 | loss    0.2310 | ... | ev  0.930 | dead   1.2% | ...`."""
    return (f"step {m['step']:>7d} | loss {m['loss']:9.4g} | mse {m['mse']:9.4g} | l1 {m['l1']:9.4g} | "
            f"l0 {m['l0']:7.1f} | ev {m['explained_variance']:6.3f} | "
            f"dead {100 * m['dead_fraction']:5.1f}% | lr {m['lr']:.2e} | tok/s {m['tokens_per_s']:>11,.0f}"
            + (f" | coeff {m['sparsity_coeff']:.3g}" if "sparsity_coeff" in m else ""))


class MetricsFile:
    """metrics.jsonl on rank 0: one JSON object per log step (appended across a resume)."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        if fresh:
            path.write_text("")

    def write(self, m: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: m[k] for k in METRIC_KEYS + OPTIONAL_KEYS if k in m}) + "\n")

    def last(self) -> dict:
        """The last record written (an empty dict if none)."""
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return json.loads(lines[-1]) if lines else {}
