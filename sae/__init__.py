"""saetron.sae: the SparseAutoencoder, its config, losses, persistence and (later) the trainer."""

from .config import SAEConfig
from .model import SparseAutoencoder, explained_variance_of, fired_latents

__all__ = ["SAEConfig", "SparseAutoencoder", "explained_variance_of", "fired_latents"]
