"""Held-out evaluation of an SAE and the EleutherAI sparsify peer run, for bench/quality.py.

`evaluate(reconstruct, x, d_sae)` takes any SAE as a function x [n, d_in] -> (x_hat [n, d_in],
fired bool [n, d_sae]) and reports, over the held-out rows x [N, d_in]:

    explained_variance         1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows
    explained_variance_normal  the same over rows with ||x|| <= 10 x the median row norm of x
    median_fvu                 median over rows of ||x - x_hat||^2 / ||x - mean(x)||^2 (exact)
    l0                         mean number of latents firing per row
    dead_fraction              latents firing on no row of x
    outlier_rows               rows over the 10x limit (what the normal-row figure leaves out)

The definitions are saetron.sae.losses' (the trainer logs the same ones), with the held-out rows'
own mean and median norm as reference points.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from saetron.sae import SparseAutoencoder
from saetron.sae.data import ActivationStore, BatchLoader, ShuffleOrder
from saetron.sae.losses import explained_variance_of, normal_rows, per_token_fvu

EVAL_CHUNK_ROWS = 2048  # bounds the dense [rows, d_sae] features of the reference forward


def load_rows(data_dir: str) -> Tensor:
    """Every row of an activation store, in store order: [N, d_model] float32."""
    store = ActivationStore(data_dir)
    out = torch.empty(store.total_tokens, store.d_model, dtype=store.dtype)
    return store.gather(np.arange(store.total_tokens, dtype=np.int64), out).float()


@torch.no_grad()
def evaluate(reconstruct: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, d_sae: int) -> dict:
    """The held-out figures of the module docstring for one SAE."""
    parts = [reconstruct(chunk) for chunk in x.split(EVAL_CHUNK_ROWS)]
    x_hat = torch.cat([p[0].float() for p in parts])  # [N, d_in]
    fired = torch.cat([p[1] for p in parts])  # [N, d_sae] bool
    normal = normal_rows(x, x.norm(dim=-1).median())  # [N]
    return {
        "explained_variance": explained_variance_of(x, x_hat).item(),
        "explained_variance_normal": explained_variance_of(x[normal], x_hat[normal]).item(),
        "median_fvu": per_token_fvu(x, x_hat, x.mean(0)).median().item(),
        "l0": fired.sum(-1).double().mean().item(),
        "dead_fraction": (~fired.any(0)).double().mean().item(),
        "rows": len(x),
        "outlier_rows": int((~normal).sum()),
    }


def saetron_reconstruct(folder: str) -> tuple[Callable[[Tensor], tuple[Tensor, Tensor]], int]:
    """A saved saetron SAE as `evaluate`'s function (dense reference forward), and its d_sae."""
    sae = SparseAutoencoder.load(folder, backend="reference").eval()

    def reconstruct(x: Tensor) -> tuple[Tensor, Tensor]:
        recon, features, _ = sae(x)
        return recon, features > 0

    return reconstruct, sae.d_sae


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
    Returns (the SparseCoder, `evaluate`'s function for it)."""
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

    @torch.no_grad()
    def reconstruct(x: Tensor) -> tuple[Tensor, Tensor]:
        out = sae(x)
        fired = torch.zeros(len(x), d_sae, dtype=torch.bool)
        fired.scatter_(1, out.latent_indices, out.latent_acts > 0)
        return out.sae_out, fired

    return sae, reconstruct
