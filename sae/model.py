"""SparseAutoencoder: one forward over the backend interface; the reference backend is the seed's SAE.

Forward, for x [B, d_in] (any leading shape is flattened to B):

    x_n            = normalize(x)                                   # [B, d_in]  (normalization.py)
    sae_in         = x_n - b_dec * apply_b_dec_to_input             # [B, d_in]
    pre            = sae_in @ W_enc + b_enc                         # [B, d_sae] (never whole on
                                                                    #  the sparse backends)
    code           = the architecture's selection of pre, activated # [B, K]     (architectures/)
    recon_n        = code @ W_dec + b_dec                           # [B, d_in]
    reconstructed  = denormalize(recon_n)                           # [B, d_in], input units

Every backend (kernels/backend.py: reference, torch, triton) runs the same forward: the normalization
hands it (enc_in, shift, bias), the architecture its selection rules, and the backend encodes
(pre-activations -> one Selection per rule) and decodes (code -> reconstruction). `activation_mean`
[d_in] is a buffer estimated exactly (float64 sums) by `estimate_activation_mean` over batches before
training; it is saved with the model and is never trained.

Losses (`loss_dict`, all scalars):
    mse                 mean over tokens and elements of (recon_n - x_n)^2, in the SAE's (normalized) space
    l1                  l1_coeff * mean over tokens of sum_i f_i * ||W_dec[i]||
    loss                mse + the architecture's sparsity loss when it is part of the loss (relu: l1;
                        jumprelu: its L0 penalty `l0_penalty`; topk, batchtopk: none, their sparsity
                        is structural; l1 is reported) + its auxiliary losses (topk, batchtopk in
                        training: `auxk`)
    l0                  mean number of active latents per token (detached)
    explained_variance  1 - sum ||x - reconstructed||^2 / sum ||x - mean_batch(x)||^2 (input units, detached)
An architecture may add keys (its sparsity loss when not `l1`, its auxiliary losses).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saetron.kernels.dispatch import (
    BACKENDS,
    BackendUnavailable,
    DensityGate,
    backend_ops,
    log_once,
    requested_backend,
    resolve_backend,
)
from saetron.kernels.selection import Selection
from saetron.kernels.sparse_code import SparseCode

from .architectures import LossInputs, get_architecture
from .config import SAEConfig
from .losses import explained_variance_of
from .normalization import LAYER_NORM_EPS, EncoderOperands, Normalization

__all__ = ["LAYER_NORM_EPS", "SparseAutoencoder"]


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
        aux_k_coeff: float = 1 / 32,
        dead_window: int = 1_000_000,
        l0_coeff: float = 1e-3,
        jumprelu_bandwidth: float = 0.1,
        jumprelu_start_batches: int = 50,
        jumprelu_ste_to_input: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {BACKENDS}")
        self.backend = backend
        self._density_gate = DensityGate(d_sae)  # auto's per-batch choice of the reference backend
        self.cfg = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            normalize_activations=normalize_activations,
            apply_b_dec_to_input=apply_b_dec_to_input,
            l1_coeff=l1_coeff,
            activation=activation,
            k=k,
            aux_k_coeff=aux_k_coeff,
            dead_window=dead_window,
            l0_coeff=l0_coeff,
            jumprelu_bandwidth=jumprelu_bandwidth,
            jumprelu_start_batches=jumprelu_start_batches,
            jumprelu_ste_to_input=jumprelu_ste_to_input,
        )
        factory = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        self.register_buffer("activation_mean", torch.zeros(d_in, **factory))
        self.normalization = Normalization(normalize_activations)
        self.architecture = get_architecture(activation)(self.cfg, **factory)
        self.reset_parameters()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: SAEConfig, **factory) -> SparseAutoencoder:
        fields = cfg.to_dict()
        positional = [fields.pop(name) for name in ("d_in", "d_sae", "normalize_activations",
                                                    "apply_b_dec_to_input")]
        return cls(*positional, **fields, **factory)

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
        return self.normalization.normalize(x, self.activation_mean)

    def denormalize(self, recon_n: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        """Inverse of `normalize` with the same token's statistics: [B, d_in] -> [B, d_in]."""
        return self.normalization.denormalize(recon_n, stats, self.activation_mean)

    def encode(self, x_n: Tensor) -> Tensor:
        """Normalized input [B, d_in] -> dense activations f [B, d_sae]: the architecture's dense form."""
        sae_in = x_n - self.b_dec if self.cfg.apply_b_dec_to_input else x_n  # [B, d_in]
        return self.architecture.dense_activation(sae_in @ self.W_enc + self.b_enc)

    def decode(self, f: Tensor) -> Tensor:
        """Dense activations f [B, d_sae] -> normalized reconstruction [B, d_in]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | SparseCode, dict[str, Tensor]]:
        """x [..., d_in] -> (reconstructed [B, d_in], features, loss_dict), on the backend `self.backend`.

        `features` is dense [B, d_sae] on backend `reference` and a `SparseCode` (indices, values
        [B, K]; `.to_dense(d_sae)` for the dense form) on every other backend, `auto` included: a
        batch that auto's density gate sends to the reference backend (early ReLU training) returns
        its code too, so the type never changes mid-training. The loss_dict is the same on every
        backend.
        """
        x = self._check_input(x).to(self.W_enc.dtype)
        requested = requested_backend(self.backend)
        backend = resolve_backend(self.backend, x.device)
        gate = self._density_gate if requested == "auto" else None
        if gate is not None and gate.dense:
            backend = "reference"
        operands = self.normalization.encoder_operands(x, self.activation_mean, self.b_dec,
                                                       self.cfg.apply_b_dec_to_input)
        selections, code = self._encode(backend, operands)
        if gate is not None:
            if backend != "reference" and gate.too_wide(code.indices.shape[1], x.device):
                backend = "reference"  # this batch's code is too wide to pay off: redo it dense
                selections, code = self._encode(backend, operands)
            elif backend == "reference":
                gate.observe_dense(code.values.detach())
        ops = backend_ops(backend)
        out = ops.decode(code, self.W_dec, operands.bias)  # [B, d_in]
        reconstructed = self.normalization.reconstruct(out, operands.stats)
        loss_dict = self._losses(x, operands, out, reconstructed, selections, code, ops)
        if self.training:
            self.architecture.dead_latents.update(code)
            self.architecture.observe(selections, code)
        features = code.to_dense(self.cfg.d_sae) if requested == "reference" else code
        return reconstructed, features, loss_dict

    def _encode(self, backend: str, operands: EncoderOperands) -> tuple[list[Selection], SparseCode]:
        """The architecture's selections of this batch on `backend`, and its code."""
        rules = self.architecture.selection_rules()
        ops = backend_ops(backend)
        selections = ops.encode(operands.enc_in, operands.shift, self.W_enc, self.b_enc, rules)
        return selections, self.architecture.activate(selections)

    def _losses(self, x: Tensor, operands: EncoderOperands, out: Tensor, reconstructed: Tensor,
                selections: list[Selection], code: SparseCode, ops) -> dict[str, Tensor]:
        """The loss_dict of a batch (see the module docstring)."""
        mse = F.mse_loss(out, operands.enc_in)  # one fused kernel each way: out - enc_in = recon_n - x_n
        decoder_norms = self.W_dec.norm(dim=-1)  # [d_sae]
        l1 = self.cfg.l1_coeff * (code.values * decoder_norms[code.indices]).sum(-1).mean()
        zero_bias = torch.zeros(self.cfg.d_in, dtype=self.W_dec.dtype, device=self.W_dec.device)
        inputs = LossInputs(selections, code, decoder_norms, l1, operands.enc_in, out,
                            lambda c: ops.decode(c, self.W_dec, zero_bias))
        arch = self.architecture
        sparsity = arch.sparsity_loss(inputs)
        auxiliary = arch.auxiliary_losses(inputs)
        loss = mse + sparsity if arch.sparsity_in_loss else mse
        for term in auxiliary.values():
            loss = loss + term
        with torch.no_grad():
            l0 = (code.values > 0).sum(-1).float().mean()
            # sum ||x - reconstructed||^2 is the mse's numerator when both are in input units
            residual = None if operands.stats is not None else mse.detach() * x.numel()
            explained_variance = explained_variance_of(x, reconstructed, residual)
        loss_dict = {"loss": loss, "mse": mse, "l1": l1, "l0": l0, "explained_variance": explained_variance}
        loss_dict.setdefault(arch.sparsity_key, sparsity)
        loss_dict.update(auxiliary)
        return loss_dict

    # -- decoder-norm constraint ---------------------------------------------------------------

    # Under FSDP2 W_dec and its gradient are DTensors sharded on dim 0 (latents): both ops are
    # row-wise, so each rank works on its local rows and no communication is needed.

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Before the optimizer step: remove from each W_dec row's gradient its component along the row."""
        if self.W_dec.grad is None:
            return
        W, G = _local(self.W_dec), _local(self.W_dec.grad)
        backend_ops(self._decoder_norm_backend(W.device)).remove_parallel_grad_(W, G)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """After the optimizer step: every W_dec row back to unit L2 norm."""
        W = _local(self.W_dec)
        backend_ops(self._decoder_norm_backend(W.device)).normalize_rows_(W)

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
        """Load what `save` wrote, in inference mode (`.train()` to train it further); a mismatched version,
        shape, missing tensor or bad file is a ValueError."""
        from .io import load_sae

        return load_sae(folder, device=device, backend=backend)

    def export_saelens(self, folder: str | Path, model_name: str, hook_name: str) -> Path:
        """Write SAELens' on-disk format (`cfg.json` + `sae_weights.safetensors`), centering folded in."""
        from .io import export_saelens

        return export_saelens(self, folder, model_name=model_name, hook_name=hook_name)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter or gradient), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
