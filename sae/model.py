"""SparseAutoencoder: the reference SAE of the seed (v1.1), pure PyTorch, the oracle of every kernel.

Forward, for x [B, d_in] (any leading shape is flattened to B):

    x_n            = normalize(x)                                   # [B, d_in]
    sae_in         = x_n - b_dec * apply_b_dec_to_input             # [B, d_in]
    pre            = sae_in @ W_enc + b_enc                         # [B, d_sae]
    f              = ReLU(pre)  or  ReLU(topk_k(pre))               # [B, d_sae]
    recon_n        = f @ W_dec + b_dec                              # [B, d_in]
    reconstructed  = denormalize(recon_n)                           # [B, d_in], input units

normalize_activations:
    expected_average_only_in  x_n = x - activation_mean; recon = recon_n + activation_mean.
                              saetron's meaning (the seed's): a centering. SAELens uses the same
                              name for a norm *rescaling*; the two are not interchangeable.
    layer_norm                per token, SAELens' convention: mu = mean(x), s = std(x) (unbiased),
                              x_n = (x - mu) / (s + 1e-5); recon = recon_n * s + mu.
    none                      identity.

`activation_mean` [d_in] is a buffer estimated exactly (float64 sums) by `estimate_activation_mean`
over batches before training; it is saved with the model and is never trained.

Losses (`loss_dict`, all scalars):
    mse                 mean over tokens and elements of (recon_n - x_n)^2, in the SAE's (normalized) space
    l1                  l1_coeff * mean over tokens of sum_i f_i * ||W_dec[i]||
    loss                mse + l1 for relu; mse for topk (sparsity is structural there; l1 is reported)
    l0                  mean number of active latents per token (detached)
    explained_variance  1 - sum ||x - reconstructed||^2 / sum ||x - mean_batch(x)||^2 (input units, detached)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from saetron.kernels.dispatch import (
    BACKENDS,
    BackendUnavailable,
    DensityGate,
    backend_ops,
    dense_width_threshold,
    log_once,
    requested_backend,
    resolve_backend,
)
from saetron.kernels.reference import (
    activate_ref,
    normalize_rows_ref,
    remove_parallel_grad_ref,
    sparse_code_ref,
)
from saetron.kernels.sparse_code import SparseCode

from .config import SAEConfig
from .losses import explained_variance_of
from .sparse_forward import sparse_forward

LAYER_NORM_EPS = 1e-5  # SAELens' value, so a layer_norm SAE exports to SAELens unchanged.


class SparseAutoencoder(nn.Module):
    """A one-layer sparse autoencoder W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        normalize_activations: str = "expected_average_only_in",
        apply_b_dec_to_input: bool = False,
        *,
        l1_coeff: float = 5e-3,
        activation: str = "relu",
        k: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {BACKENDS}")
        self.backend = backend
        # sparse-path state: auto's dense choice, ReLU capacity
        self._density_gate = DensityGate(dense_width_threshold(d_sae))
        self.cfg = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            normalize_activations=normalize_activations,
            apply_b_dec_to_input=apply_b_dec_to_input,
            l1_coeff=l1_coeff,
            activation=activation,
            k=k,
        )
        factory = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        self.register_buffer("activation_mean", torch.zeros(d_in, **factory))
        self.reset_parameters()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: SAEConfig, **factory) -> SparseAutoencoder:
        return cls(
            cfg.d_in,
            cfg.d_sae,
            cfg.normalize_activations,
            cfg.apply_b_dec_to_input,
            l1_coeff=cfg.l1_coeff,
            activation=cfg.activation,
            k=cfg.k,
            **factory,
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Encoder Kaiming-uniform (fan_in = d_in, gain sqrt(2)); decoder = encoder^T, unit rows; biases 0."""
        bound = math.sqrt(2.0) * math.sqrt(3.0 / self.cfg.d_in)
        self.W_enc.uniform_(-bound, bound)
        self.W_dec.copy_(self.W_enc.t())
        self.normalize_decoder()
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.activation_mean.zero_()

    # -- properties used by tools --------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # -- statistics ------------------------------------------------------------------------------

    @torch.no_grad()
    def estimate_activation_mean(self, batches: Iterable[Tensor]) -> Tensor:
        """Set `activation_mean` to the exact mean of all rows of `batches` (each [N, d_in]).

        Sums in float64 so that millions of tokens do not lose precision. Returns the new buffer.
        """
        total = torch.zeros(self.cfg.d_in, dtype=torch.float64, device=self.activation_mean.device)
        count = 0
        for batch in batches:
            batch = self._check_input(batch)
            total += batch.to(total.device, torch.float64).sum(0)
            count += batch.shape[0]
        if count == 0:
            raise ValueError("estimate_activation_mean got no rows; pass at least one non-empty batch")
        self.activation_mean.copy_((total / count).to(self.activation_mean.dtype))
        return self.activation_mean

    # -- forward ---------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(
                f"expected a torch.Tensor of shape [..., {self.cfg.d_in}]; got {type(x).__name__}"
            )
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input width {tuple(x.shape)[-1:] or '()'} does not match d_in={self.cfg.d_in}: "
                f"expected shape [..., {self.cfg.d_in}], got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point input; got dtype {x.dtype}")
        x = x.reshape(-1, self.cfg.d_in)
        # One reduction first (any NaN/Inf makes the sum non-finite; an overflow of a finite sum only
        # costs the full check), the per-element check only on suspicion.
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(-1).sum())
            raise ValueError(
                f"input holds NaN or Inf in {bad} of {x.shape[0]} rows; clean the activations "
                "(a collector or model in too low a precision is the usual cause)"
            )
        return x

    def normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x [B, d_in] -> (x_n [B, d_in], the statistics `denormalize` needs)."""
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            return x - self.activation_mean.to(x.dtype), None
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)  # [B, 1]
            std = (x - mu).std(-1, keepdim=True)  # [B, 1]
            return (x - mu) / (std + LAYER_NORM_EPS), (mu, std)
        return x, None

    def denormalize(self, recon_n: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        """Inverse of `normalize` with the same token's statistics: [B, d_in] -> [B, d_in]."""
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            return recon_n + self.activation_mean.to(recon_n.dtype)
        if mode == "layer_norm":
            mu, std = stats
            return recon_n * std + mu
        return recon_n

    def encode(self, x_n: Tensor) -> Tensor:
        """Normalized input [B, d_in] -> dense activations f [B, d_sae]."""
        sae_in = x_n - self.b_dec if self.cfg.apply_b_dec_to_input else x_n  # [B, d_in]
        pre = sae_in @ self.W_enc + self.b_enc  # [B, d_sae]
        return activate_ref(pre, self.cfg.activation, self.cfg.k)

    def decode(self, f: Tensor) -> Tensor:
        """Activations f [B, d_sae] -> normalized reconstruction [B, d_in]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | SparseCode, dict[str, Tensor]]:
        """x [..., d_in] -> (reconstructed [B, d_in], features, loss_dict), on the backend `self.backend`.

        `features` is dense [B, d_sae] on backend `reference` and a `SparseCode` (indices, values
        [B, K]; `.to_dense(d_sae)` for the dense form) on every other backend, `auto` included: a
        batch that auto's density gate sends to the dense path (early ReLU training) has its features
        converted, so the type never changes mid-training. `fired_latents` takes either. The
        loss_dict is the same on every backend.
        """
        x = self._check_input(x)
        x = x.to(self.W_enc.dtype)
        backend = resolve_backend(self.backend, x.device)
        auto = requested_backend(self.backend) == "auto"  # auto may send a batch to the dense path
        if backend != "reference":
            out = sparse_forward(self, x, backend, self._density_gate, dense_fallback=auto)
            if out is not None:
                return out
        reconstructed, features, loss_dict = self._reference_forward(x)
        if auto:
            self._density_gate.observe_dense(features)
            return reconstructed, sparse_code_ref(features.detach()), loss_dict
        return reconstructed, features, loss_dict

    def _reference_forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The dense oracle (the seed's forward): x [B, d_in] -> (reconstructed, features, loss_dict)."""
        x_n, stats = self.normalize(x)
        features = self.encode(x_n)  # [B, d_sae]
        recon_n = self.decode(features)  # [B, d_in]
        reconstructed = self.denormalize(recon_n, stats)  # [B, d_in]

        mse = (recon_n - x_n).pow(2).mean()
        decoder_norms = self.W_dec.norm(dim=-1)  # [d_sae]
        l1 = self.cfg.l1_coeff * (features * decoder_norms).sum(-1).mean()
        loss = mse + l1 if self.cfg.activation == "relu" else mse
        with torch.no_grad():
            l0 = (features > 0).sum(-1).float().mean()
            explained_variance = explained_variance_of(x, reconstructed)
        loss_dict = {"loss": loss, "mse": mse, "l1": l1, "l0": l0, "explained_variance": explained_variance}
        return reconstructed, features, loss_dict

    # -- decoder-norm constraint ---------------------------------------------------------------

    # Under FSDP2 W_dec and its gradient are DTensors sharded on dim 0 (latents): both ops are
    # row-wise, so each rank works on its local rows and no communication is needed.

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Before the optimizer step: remove from each W_dec row's gradient its component along the row."""
        if self.W_dec.grad is None:
            return
        W, G = _local(self.W_dec), _local(self.W_dec.grad)
        backend = self._decoder_norm_backend(W.device)
        if backend == "reference":
            G.copy_(remove_parallel_grad_ref(W, G))
        else:
            backend_ops(backend).remove_parallel_grad_(W, G)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """After the optimizer step: every W_dec row back to unit L2 norm."""
        W = _local(self.W_dec)
        backend = self._decoder_norm_backend(W.device)
        if backend == "reference":
            W.copy_(normalize_rows_ref(W))
        else:
            backend_ops(backend).normalize_rows_(W)

    def _decoder_norm_backend(self, device: torch.device) -> str:
        """The forward's backend; a triton model whose weights sit on the CPU (just built, before
        `.cuda()`) keeps its decoder in shape with the torch ops rather than failing."""
        try:
            return resolve_backend(self.backend, device)
        except BackendUnavailable as err:
            log_once("decoder-norm-torch", "decoder-norm ops on the torch backend: %s", err)
            return "torch"

    # -- persistence (see saetron.sae.io) -------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write `sae.safetensors` + `sae_config.json` (with `format_version`) into folder."""
        from .io import save_sae

        return save_sae(self, folder)

    @classmethod
    def load(
        cls, folder: str | Path, device: torch.device | str = "cpu", backend: str = "auto"
    ) -> SparseAutoencoder:
        """Load what `save` wrote; a mismatched version, shape, missing tensor or bad file is a ValueError."""
        from .io import load_sae

        return load_sae(folder, device=device, backend=backend)

    def export_saelens(self, folder: str | Path, model_name: str, hook_name: str) -> Path:
        """Write SAELens' on-disk format (`cfg.json` + `sae_weights.safetensors`), centering folded in."""
        from .io import export_saelens

        return export_saelens(self, folder, model_name=model_name, hook_name=hook_name)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter or gradient), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
