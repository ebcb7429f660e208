"""saetron.sae: the SparseAutoencoder, its config, losses, persistence, and the trainer (.train)."""

from .config import SAEConfig
from .losses import explained_variance_of, fired_latents
from .model import SparseAutoencoder

__all__ = ["SAEConfig", "SparseAutoencoder", "explained_variance_of", "fired_latents"]
