"""SAEConfig: the architecture of a SparseAutoencoder, validated, JSON-serializable.

    SAEOptions   every field but the input width, declared once: the trainer's TrainConfig inherits
                 them (one command-line flag each), SAEConfig adds d_in
    SAEConfig    SAEOptions + d_in: what `sae_config.json` holds
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from .architectures import ARCHITECTURES, get_architecture

Normalization = Literal["expected_average_only_in", "layer_norm", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
ACTIVATION_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)  # every module of sae/architectures/
Activation = Literal[ACTIVATION_NAMES]  # the registry's names (a Literal so that CLIs list them)


@dataclass(kw_only=True)
class SAEOptions:
    """What defines an SAE's function, apart from the width of its input (SAEConfig adds it)."""

    d_sae: int = 16384
    """Number of latents (dictionary size)."""
    normalize_activations: Normalization = "expected_average_only_in"
    """How inputs are normalized before encoding (and the reconstruction de-normalized):
    `expected_average_only_in` centers by the `activation_mean` buffer (saetron's meaning: SAELens
    uses this name for a norm rescaling), `layer_norm` per token, `none`."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from the (normalized) input before the encoder."""
    l1_coeff: float = 5e-3
    """Weight of the L1 sparsity penalty sum_i f_i ||W_dec[i]|| (`relu`; the others report it only). With
    the trainer's --target_l0, where the coefficient starts."""
    activation: Activation = "relu"
    """The architecture (sae/architectures/): `relu` (the seed), `topk` (keep the k largest
    pre-activations per token, then ReLU), `batchtopk` (the batch's B*k largest in training, a learned
    global threshold at inference), `jumprelu` (learned per-latent thresholds, an L0 penalty)."""
    k: int | None = None
    """`topk`: active latents per token; `batchtopk`: per token on average over a batch; `jumprelu`: the
    L0 at which its thresholds start (set on the first training batch; the trainer's default: its
    --target_l0); must be None for `relu`."""
    aux_k_coeff: float = 1 / 32
    """Weight of the AuxK loss (`topk`, `batchtopk`; 0 turns it off): the dead latents' top-k_aux
    pre-activations (k_aux = d_in / 2) reconstruct the residual x - x_hat (architectures/auxk.py)."""
    dead_window: int = 1_000_000
    """A latent is dead after this many training tokens (all ranks together) without firing: AuxK's
    candidates and the trainer's dead_fraction (sae/dead_latents.py); also the window over which the
    trainer's saelens/sparsity.safetensors measures feature density."""
    l0_coeff: float = 1e-3
    """Weight of `jumprelu`'s L0 penalty l0_coeff * mean over tokens of sum_i H(pre_i - theta_i), in the
    units of the mse (mean over tokens and elements of the normalized input). With the trainer's
    --target_l0, where the coefficient starts, in units of the data's scale: l0_coeff * v, v = the
    per-element variance of the first batch's normalized input (sae/sparsity_control.py)."""
    jumprelu_bandwidth: float = 0.1
    """`jumprelu`'s straight-through estimator's kernel width, as a fraction of the thresholds' starting
    value (the threshold at L0 = k of the last start batch), so that it follows the activations' scale."""
    jumprelu_start_batches: int = 50
    """`jumprelu`'s first training batches are BatchTopK ones (L0 = k, no L0 penalty) while the encoder's
    scale settles; the last sets where the thresholds start. At least 1."""
    jumprelu_ste_to_input: bool = True
    """`jumprelu`'s straight-through estimator also reaches the pre-activations (Anthropic's variant; False:
    DeepMind's, the thresholds only); sae/architectures/jumprelu.py says why True is the default."""

    def __post_init__(self) -> None:
        _check_positive_int("d_sae", self.d_sae)
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalize_activations {self.normalize_activations!r}; allowed: {NORMALIZATIONS}"
            )
        for name in ("apply_b_dec_to_input", "jumprelu_ste_to_input"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")
        for name in ("l1_coeff", "aux_k_coeff", "l0_coeff", "jumprelu_bandwidth"):
            value, positive = getattr(self, name), name == "jumprelu_bandwidth"
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    (0 < value if positive else 0 <= value) and value < math.inf):
                bound = "> 0" if positive else ">= 0"
                raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
        for name in ("dead_window", "jumprelu_start_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        get_architecture(self.activation).check_config(self)  # unknown name: ValueError with the allowed

    def options(self) -> dict:
        """The SAEOptions fields of self (of a TrainConfig too): name -> value."""
        return {f.name: getattr(self, f.name) for f in fields(SAEOptions)}


@dataclass
class SAEConfig(SAEOptions):
    """What defines an SAE's function; saved as `sae_config.json` beside its weights. Constructed as
    SAEConfig(d_in, d_sae=..., ...) (the options are keyword-only)."""

    d_in: int
    """Width of the activations the SAE reads (d_model of the hooked layer)."""

    def __post_init__(self) -> None:
        _check_positive_int("d_in", self.d_in)
        super().__post_init__()

    def to_dict(self) -> dict:
        return asdict(self)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
