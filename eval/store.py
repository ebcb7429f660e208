"""The evaluation's one door to the activation store: `open_store` (everything else here goes through it).

The store (DESIGN.md) is manifest.json + shard_*.safetensors, each shard holding `activations
[N, d_model]`, `token_ids [N]` and `positions [N]` (position in the context window) in the order the
collector wrote them: the kept rows of each window in order, windows in order, a shard always ends at
a batch end, so a window never spans two shards. Rows are addressed by a global row id over the
chosen shards.

Reading: the manifest is validated by the store module (`saetron.collect.store.read_manifest`: format,
version, no shard = an error); tensors are read a slice at a time through safetensors' lazy
`get_slice`, so memory is one chunk, whatever the store's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from saetron.collect.store import read_manifest

TENSORS = ("activations", "token_ids", "positions")


@dataclass
class StoreChunk:
    """Consecutive rows [start, start + n) of the chosen shards."""

    start: int
    activations: torch.Tensor  # [n, d_model] float32
    token_ids: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] int64


class EvalStore:
    """Shards [first_shard, first_shard + num_shards) of a store, read lazily."""

    def __init__(self, data_dir: str | Path, first_shard: int = 0, num_shards: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        shards = self.manifest["shards"]
        if not shards:
            raise ValueError(f"{self.data_dir / 'manifest.json'} lists no shards: the collection wrote "
                             "nothing yet; let it write its first shard")
        if not 0 <= first_shard < len(shards):
            raise ValueError(f"--first_shard {first_shard}: the store {str(self.data_dir)!r} has "
                             f"{len(shards)} shards; pick 0..{len(shards) - 1}")
        stop = len(shards) if num_shards is None else first_shard + num_shards
        if num_shards is not None and (num_shards < 1 or stop > len(shards)):
            raise ValueError(f"--num_shards {num_shards} from --first_shard {first_shard}: the store has "
                             f"{len(shards)} shards; pass 1..{len(shards) - first_shard} or omit it")
        self.first_shard = first_shard
        self.shards = shards[first_shard:stop]
        self.d_model = int(self.manifest["d_model"])
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + int(shard["tokens"]))
        self.total_tokens = self.starts[-1]
        if self.total_tokens == 0:
            raise ValueError(f"the store {str(self.data_dir)!r} holds no rows in shards {self.shard_range}; "
                             "collect more text or choose other shards")

    @property
    def shard_range(self) -> str:
        return f"{self.first_shard}..{self.first_shard + len(self.shards) - 1}"

    @property
    def shard_files(self) -> list[str]:
        return [s["file"] for s in self.shards]

    def _read(self, index: int, lo: int, hi: int, names: tuple[str, ...] = TENSORS) -> list[torch.Tensor]:
        """Tensors `names` of shard `index`, rows [lo, hi) of it."""
        path = self.data_dir / self.shards[index]["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                out = [f.get_slice(name)[lo:hi] for name in names]
        except Exception as error:  # missing, truncated, foreign: the same to the user
            raise ValueError(f"shard {path} cannot be read ({type(error).__name__}: {error}); it is missing "
                             "or damaged: collect it again or choose other shards") from error
        if "activations" in names and out[0].shape[-1] != self.d_model:
            raise ValueError(f"shard {path} holds activations of width {out[0].shape[-1]}, the manifest "
                             f"says d_model {self.d_model}; the store is inconsistent: collect it again")
        return out

    def rows(self, start: int, stop: int) -> StoreChunk:
        """Rows [start, stop) (global ids), which may span shards."""
        parts = []
        for s in range(len(self.shards)):
            lo, hi = max(start, self.starts[s]), min(stop, self.starts[s + 1])
            if lo < hi:
                parts.append(self._read(s, lo - self.starts[s], hi - self.starts[s]))
        acts, token_ids, positions = (torch.cat(p) for p in zip(*parts))
        return StoreChunk(start, acts.float(), token_ids.long(), positions.long())

    def chunks(self, rows_per_chunk: int, max_tokens: int | None = None) -> Iterator[StoreChunk]:
        """The first `max_tokens` rows (all if None) in order, `rows_per_chunk` at a time."""
        total = self.total_tokens if max_tokens is None else min(max_tokens, self.total_tokens)
        for start in range(0, total, rows_per_chunk):
            yield self.rows(start, min(start + rows_per_chunk, total))

    def window_of(self, row: int) -> tuple[int, int]:
        """The rows [lo, hi) of the context window holding `row`: the run of rows around it whose
        positions increase (a window's kept rows are consecutive with strictly increasing positions; the
        next window starts at a position not above the last one's; windows never span shards). Reads at
        most 2 * context_size positions: a window holds at most context_size rows."""
        s = next(i for i in range(len(self.shards)) if row < self.starts[i + 1])
        span = int(self.manifest.get("context_size") or 4096)
        local, size = row - self.starts[s], self.starts[s + 1] - self.starts[s]
        first = max(0, local - span)
        (positions,) = self._read(s, first, min(size, local + span), ("positions",))
        at = local - first
        lo, hi = at, at + 1
        while lo > 0 and positions[lo - 1] < positions[lo]:
            lo -= 1
        while hi < len(positions) and positions[hi] > positions[hi - 1]:
            hi += 1
        return self.starts[s] + first + lo, self.starts[s] + first + hi

def open_store(data_dir: str | Path, first_shard: int = 0, num_shards: int | None = None) -> EvalStore:
    """The adapter: shards [first_shard, first_shard + num_shards) of the store at `data_dir`.

    Raises ValueError for a missing, foreign or empty store and for shards that do not exist.
    """
    return EvalStore(data_dir, first_shard, num_shards)
