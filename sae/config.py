"""SAEConfig: the architecture of a SparseAutoencoder, validated, JSON-serializable."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

Normalization = Literal["expected_average_only_in", "layer_norm", "none"]
Activation = Literal["relu", "topk"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
ACTIVATION_NAMES: tuple[str, ...] = get_args(Activation)


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
    """`relu` (the seed) or `topk` (keep the k largest pre-activations per token, then ReLU)."""
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
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"unknown activation {self.activation!r}; allowed: {ACTIVATION_NAMES}")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise ValueError(f"apply_b_dec_to_input must be a bool; got {self.apply_b_dec_to_input!r}")
        if not (self.l1_coeff >= 0):  # also rejects NaN
            raise ValueError(f"l1_coeff must be >= 0; got {self.l1_coeff!r}")
        if self.activation == "topk":
            if self.k is None:
                raise ValueError(f"activation='topk' needs k, an int in [1, d_sae={self.d_sae}]; got k=None")
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise ValueError(f"k must be an int in [1, d_sae={self.d_sae}]; got k={self.k!r}")
        elif self.k is not None:
            raise ValueError(f"k={self.k!r} is only used with activation='topk'; got activation='relu'")

    def to_dict(self) -> dict:
        return asdict(self)
