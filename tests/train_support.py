"""Test support for the trainer: tiny activation stores in the collector's exact format, and runners.

`write_store` writes what saetron-collect writes, through the same writer (saetron.collect.store):
manifest.json and shard_XXXXX.safetensors with activations [N, d_model], token_ids [N] int32,
positions [N] int32.
The activations follow a sparse generative model an SAE can learn: each token is an offset plus a few
of `n_features` random unit directions with exponential magnitudes, plus small noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from saetron.collect.store import new_manifest, read_shard_header, row_norms, write_shard

REPO = Path(__file__).resolve().parents[1]


def synthetic_activations(n: int, d_model: int, n_features: int, active: float, seed: int) -> torch.Tensor:
    """[n, d_model] float32: offset + sum of ~`active` of n_features unit directions per token + noise."""
    g = np.random.default_rng(seed)
    dirs = np.random.default_rng(1234).standard_normal((n_features, d_model))  # fixed across shards
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    offset = np.random.default_rng(4321).standard_normal(d_model) * 2.0
    on = g.random((n, n_features)) < active / n_features
    mags = g.exponential(1.0, (n, n_features)) * on
    x = offset + mags @ dirs + 0.01 * g.standard_normal((n, d_model))
    return torch.from_numpy(x.astype(np.float32))


def write_store(folder: Path, shard_tokens: list[int], d_model: int = 32, dtype: torch.dtype = torch.float32,
                target_layer: int = 3, n_features: int = 96, active: float = 4.0, seed: int = 0) -> Path:
    """Write a store of len(shard_tokens) shards into folder with the collector's writer; returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(model="test/tiny", revision="main", target_layer=target_layer,
                            hook_point="resid_post", d_model=d_model, dtype=dtype, context_size=64,
                            keep_special_tokens=False, dataset="synthetic", split="train", text_field="text",
                            tokenizer="test/tiny")
    for i, n in enumerate(shard_tokens):
        x = synthetic_activations(n, d_model, n_features, active, seed=seed * 1000 + i)
        x = x if dtype == torch.float8_e4m3fn else x.to(dtype)  # float8: write_shard encodes float rows
        token_ids = torch.randint(0, 1000, (n,), dtype=torch.int32)
        positions = torch.arange(n, dtype=torch.int32) % 63 + 1
        write_shard(folder, manifest, x, token_ids, positions, row_norms(x), stream_state={"shard": i})
    return folder


def plant(shard: Path, row: int, column: int, value: float) -> None:
    """Overwrite activations[row, column] of a written shard in place (a store damaged on disk)."""
    offset, header = read_shard_header(shard)
    info = header["activations"]
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[info["dtype"]]
    raw = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
    with open(shard, "r+b") as f:
        f.seek(offset + info["data_offsets"][0] + (row * info["shape"][1] + column) * len(raw))
        f.write(raw)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_in_process(data_dir: Path, output_dir: Path, *flags: str) -> dict:
    """Run the trainer's main() in this process (a one-rank group); returns its last metrics."""
    from saetron.sae.train import main

    return main(["--data_dir", str(data_dir), "--output_dir", str(output_dir), *flags])


def torchrun(nproc: int, data_dir: Path, output_dir: Path, *flags: str, timeout: float = 240):
    """Run the trainer under `torchrun --nproc_per_node=nproc` (gloo on CPU); returns CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "saetron.sae.train", "--data_dir", str(data_dir), "--output_dir", str(output_dir), *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
