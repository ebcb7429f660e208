"""Held-out evaluation of an SAE and the EleutherAI sparsify peer run, for bench/quality.py.

`evaluate(sae, x)` reports, over the held-out rows x [N, d_in], saetron.eval's figures (one definition,
eval/metrics.py and eval/run.py, with the held-out rows' own mean and median norm as reference points)
under the bench's keys:

    explained_variance         eval's explained_variance: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    explained_variance_normal  eval's explained_variance_typical: the same over rows with
                               ||x|| < 10 x the median row norm of x
    median_fvu                 the median of eval's per-token FVU ||x - x_hat||^2 / ||x - mean(x)||^2
    l0                         eval's l0: mean number of latents firing per row
    dead_fraction              eval's dead_fraction: latents firing on no row of x
    rows, outlier_rows         rows evaluated, and those over the 10x limit (left out of the normal figure)

`sae` is anything saetron.eval.evaluate takes: a saetron SparseAutoencoder, or `SparsifyAdapter`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn

from saetron.eval import evaluate as eval_metrics
from saetron.sae.data import ActivationStore, BatchLoader, ShuffleOrder

EVAL_CHUNK_ROWS = 2048  # bounds the dense [rows, d_sae] features of the reference forward


def load_rows(data_dir: str) -> Tensor:
    """Every row of an activation store, in store order: [N, d_model] float32."""
    store = ActivationStore(data_dir)
    out = torch.empty(store.total_tokens, store.d_model, dtype=store.dtype)
    return store.gather(np.arange(store.total_tokens, dtype=np.int64), out).float()


def evaluate(sae, x: Tensor) -> dict:
    """The held-out figures of the module docstring for one SAE over x [N, d_in]."""
    m = eval_metrics(sae, lambda: x.split(EVAL_CHUNK_ROWS))
    return {
        "explained_variance": m["explained_variance"],
        "explained_variance_normal": m["explained_variance_typical"],
        "median_fvu": m["fvu_per_token_quantiles"]["0.5"],
        "l0": m["l0"],
        "dead_fraction": m["dead_fraction"],
        "rows": m["tokens"],
        "outlier_rows": m["tokens"] - m["typical_tokens"],
    }


class SparsifyAdapter(nn.Module):
    """A sparsify SparseCoder seen as saetron.eval sees an SAE: d_in, d_sae, W_enc (for its device) and
    forward(x [n, d_in]) -> (x_hat [n, d_in], dense features [n, d_sae], None)."""

    def __init__(self, coder) -> None:
        super().__init__()
        self.coder = coder
        self.d_in, self.d_sae = coder.d_in, coder.num_latents
        self.W_enc = coder.encoder.weight

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, None]:
        out = self.coder(x)
        features = torch.zeros(len(x), self.d_sae, dtype=out.latent_acts.dtype, device=x.device)
        features.scatter_(1, out.latent_indices, out.latent_acts)
        return out.sae_out, features, None


def train_sparsify(data_dir: str, d_sae: int, k: int, batch_size: int, steps: int, seed: int,
                   shuffle_buffer: int, lr: float, max_norm: float | None = None):
    """EleutherAI sparsify's SparseCoder trained as its trainer (sparsify/trainer.py, optimizer `adam`,
    loss_fn `fvu`) does, on saetron's batch stream of `data_dir` (the trainer's order for `seed`):
    torch.manual_seed(seed) then SparseCoder (nn.Linear encoder, W_dec = its weight, unit rows); b_dec =
    the first batch's mean; each step: decoder rows to unit norm, loss = FVU over the batch (sum of
    squared errors / the batch's total variance), backward, the decoder gradient's parallel component
    removed, Adam at `lr` (constant: sparsify's 1000-step linear warm-up would outlast these runs). No
    AuxK (sparsify's default auxk_alpha is 0), no gradient clipping (sparsify has none).
    `max_norm`: skip rows above it, as saetron's --max_norm_ratio (None: every row, sparsify's way).
    Returns the trained SparseCoder as a `SparsifyAdapter`."""
    # sparsify picks its Triton decoder whenever triton imports; without a GPU it must take its eager one
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "0" if torch.cuda.is_available() else "1")
    from sparsify import SparseCoder, SparseCoderConfig

    from saetron.sae.row_stats import keep_rows

    store = ActivationStore(data_dir)
    order = ShuffleOrder(store.starts, shuffle_buffer, seed)
    loader = BatchLoader(store, order, batch_size, 0, 1, 0, steps, torch.device("cpu"))
    torch.manual_seed(seed)
    sae = SparseCoder(store.d_model, SparseCoderConfig(num_latents=d_sae, k=k), device="cpu",
                      dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for step, x in enumerate(loader):
        x, _ = keep_rows(x.float(), max_norm)
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    sae.set_decoder_norm_to_unit_norm()  # what its next forward would use
    return SparsifyAdapter(sae).eval()
