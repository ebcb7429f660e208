"""Test support for the evaluation: SAEs with known behaviour (real SparseAutoencoder weights) and stores.

identity_sae(d): d_sae = 2d, ReLU, no normalization, W_enc = [I, -I] [d, 2d], b_enc = 0,
    W_dec = [I; -I] [2d, d], b_dec = 0: f = (relu(x), relu(-x)) and f @ W_dec = relu(x) - relu(-x) = x
    exactly (each output sums one x_i times 1 and zeros), so the reconstruction is the input.
    Decoder rows are unit vectors, as the trainer keeps them.
zero_sae(d): W_enc = 0, b_enc = -1: no latent ever fires; the reconstruction is b_dec = 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saetron.collect.store import new_manifest, row_norms, write_manifest, write_shard
from saetron.sae import SparseAutoencoder


def identity_sae(d_in: int) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in, 2 * d_in, "none", False, activation="relu", backend="reference")
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d_in: int) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in, 2 * d_in, "none", False, activation="relu", backend="reference")
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
    return sae


def random_sae(d_in: int, d_sae: int, k: int | None, normalize: str = "layer_norm", seed: int = 0,
               backend: str = "auto") -> SparseAutoencoder:
    """A TopK (k given) or ReLU SAE with seeded random weights and biases."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, normalize, False, activation="topk" if k else "relu", k=k,
                            backend=backend)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.activation_mean.normal_(0, 0.5)
    return sae


def write_rows_store(folder: Path, shards: list[torch.Tensor], context: int = 16, model: str = "test/tiny",
                     target_layer: int = 3, hook_point: str = "resid_post", dataset: str = "synthetic",
                     d_model: int | None = None, dtype: torch.dtype | None = None) -> Path:
    """A store whose shards hold the given activations [n, d], written by the collector's writer; windows
    of `context - 1` rows at positions 1..context-1 (as the collector keeps them), token id = row id % 1000.
    `d_model`: the width of a store with no shard. `dtype`: the stored dtype (default: the rows'); a
    float8_e4m3fn store gets float rows, encoded by the writer."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(model=model, revision="local", target_layer=target_layer, hook_point=hook_point,
                            d_model=d_model if d_model is not None else int(shards[0].shape[1]),
                            dtype=dtype or (shards[0].dtype if shards else torch.float32),
                            context_size=context,
                            keep_special_tokens=False, dataset=dataset, split="train", text_field="text",
                            tokenizer=model)
    row = 0
    for i, x in enumerate(shards):
        ids = torch.arange(row, row + x.shape[0])
        write_shard(folder, manifest, x, ids % 1000, ids % (context - 1) + 1, row_norms(x),
                    stream_state={"shard": i})
        row += x.shape[0]
    if not shards:
        write_manifest(folder, manifest)
    return folder


def write_training_record(sae_dir: Path, *, data_dir: str, target_layer: int, model: str,
                          hook_point: str = "resid_post") -> None:
    """What the trainer leaves beside the SAE: train_config.json and saelens/cfg.json's metadata."""
    (sae_dir / "train_config.json").write_text(json.dumps({"data_dir": data_dir, "num_shards": None,
                                                           "target_layer": target_layer}))
    (sae_dir / "saelens").mkdir(exist_ok=True)
    (sae_dir / "saelens" / "cfg.json").write_text(json.dumps(
        {"metadata": {"model_name": model, "hook_name": f"blocks.{target_layer}.hook_{hook_point}"}}))
