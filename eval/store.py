"""The evaluation's view of an activation store: a range of shards of `saetron.collect.store.ActivationStore`.

The store module reads every store (its format: docs/DESIGN.md): the manifest and each chosen shard are
checked when the store opens (a missing, foreign, damaged or empty store raises StoreError, a
ValueError, with what to do), rows are read lazily through memory maps (memory is one batch, whatever
the store's size), and a float8 store's rows come back decoded with their per-row scales (float32).
The evaluation uses `ActivationStore.iter_rows` (rows in order, with token ids and positions), `read`
(a span of rows) and `window_of` (a row's context window, for the report's contexts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from torch import Tensor

from saetron.collect.store import ActivationStore


def open_store(data_dir: str | Path, first_shard: int = 0, num_shards: int | None = None) -> ActivationStore:
    """Shards [first_shard, first_shard + num_shards) of the store at `data_dir` (None: all the rest)."""
    return ActivationStore(data_dir, num_shards, first_shard=first_shard)


def shard_range(store: ActivationStore) -> str:
    """`3..9`: the chosen shards' numbers."""
    return f"{store.first_shard}..{store.first_shard + len(store.shards) - 1}"


def store_batches(store: ActivationStore, batch_size: int,
                  max_tokens: int | None = None) -> Callable[[], Iterable[Tensor]]:
    """For `evaluate`: a fresh iterable of the activations [n <= batch_size, d_model] (float32 decoded for a
    float8 store) of the store's first `max_tokens` rows (None: all), in order."""
    return lambda: (rows.activations for rows in store.iter_rows(batch_size, max_tokens))
