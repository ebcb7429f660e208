"""SAEConfig: the architecture of a SparseAutoencoder, validated, JSON-serializable."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from .architectures import ARCHITECTURES, get_architecture

Normalization = Literal["expected_average_only_in", "layer_norm", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
ACTIVATION_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)  # every module of sae/architectures/
Activation = Literal[ACTIVATION_NAMES]  # the registry's names (a Literal so that CLIs list them)


@dataclass
class SAEConfig:
    """What defines an SAE's function; saved as `sae_config.json` beside its weights."""

    d_in: int
    """Width of the activations the SAE reads (d_model of the hooked layer)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    normalize_activations: Normalization = "expected_average_only_in"
    """How inputs are normalized before encoding (and the reconstruction de-normalized):
    `expected_average_only_in` centers by the `activation_mean` buffer (saetron's meaning: SAELens
    uses this name for a norm rescaling), `layer_norm` per token, `none`."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from the (normalized) input before the encoder."""
    l1_coeff: float = 5e-3
    """Weight of the L1 sparsity penalty sum_i f_i ||W_dec[i]|| (ReLU SAEs; TopK SAEs report it only)."""
    activation: Activation = "relu"
    """The architecture (sae/architectures/): `relu` (the seed) or `topk` (keep the k largest
    pre-activations per token, then ReLU)."""
    k: int | None = None
    """Active latents per token for `topk`; must be None for `relu`."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalize_activations {self.normalize_activations!r}; allowed: {NORMALIZATIONS}"
            )
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise ValueError(f"apply_b_dec_to_input must be a bool; got {self.apply_b_dec_to_input!r}")
        if not (self.l1_coeff >= 0):  # also rejects NaN
            raise ValueError(f"l1_coeff must be >= 0; got {self.l1_coeff!r}")
        get_architecture(self.activation).check_config(self)  # unknown name: ValueError with the allowed

    def to_dict(self) -> dict:
        return asdict(self)
