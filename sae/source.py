"""Where the trainer's batches come from, chosen in one place (`open_source`):

    --data_dir STORE                    StoreSource: the store in the cross-shard shuffle order (sae/data.py)
    --data_dir STORE --buffer_tokens N  live.BufferedStoreSource: the store once, in live training's order
    --model SPEC --target_layer L       live.LiveSource: the model's hooked forwards, buffered (sae/live.py)

Every source gives the trainer the same interface: `d_model`, `target_layer`, `manifest` (the store's, or
for --model what a store of the same settings records: model, target_layer, hook_point, context_size,
dataset, for the SAE's export), `total_steps()`, `identity()` (what a resume must match beyond the
trainer's settings), `describe()` (a log line), `stats_batches(tokens, stop_step)` ((x, where) pairs for
the statistics pass), `batches(start_step, stop_step, resume)` (an iterable of this rank's
x [b, d_model] on the device, with `describe(step, rows)`, naming rows of a batch in an error, and
`state(step)`, this rank's JSON state a checkpoint keeps to resume there, or None) and `close()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from saetron.collect.lock import active_writer
from saetron.collect.store import ActivationStore

from .data import BatchLoader, ShuffleOrder, check_batch_size, describe_rows, stats_batches
from .distributed import DistEnv
from .train_config import TrainConfig

# Flags that name the data (beyond the settings every resume checks): a finished run is recognised only
# when they are the same.
SOURCE_KEYS = ("data_dir", "num_shards", "eval_tokens", "target_layer", "model", "dataset", "dataset_config",
               "split", "text_field", "hook_point", "context_size", "model_batch_size", "model_dtype",
               "keep_special_tokens", "buffer_tokens")


class StoreSource:
    """A store in the cross-shard shuffle order of sae/data.py (the default)."""

    def __init__(self, store: ActivationStore, cfg: TrainConfig, env: DistEnv, dtype: torch.dtype) -> None:
        self.store, self.cfg, self.env, self.dtype = store, cfg, env, dtype
        self.manifest, self.d_model = store.manifest, store.d_model
        self.target_layer = store.manifest["target_layer"]
        self.order = ShuffleOrder(store.starts, cfg.shuffle_buffer, cfg.seed)

    def total_steps(self) -> int:
        return planned_steps(self.cfg, self.store, self.env.world_size)

    def identity(self) -> dict:
        return {"total_tokens": self.store.total_tokens}

    def describe(self) -> str:
        return (f"store {self.cfg.data_dir}: {self.store.total_tokens} tokens in {len(self.store.shards)} "
                f"shards, d_model {self.d_model}")

    def stats_batches(self, tokens: int, stop_step: int) -> Iterator[tuple[torch.Tensor, object]]:
        when = "the statistics pass before step 0"
        for rows, x in stats_batches(self.store, self.order, tokens):
            yield x, lambda i, r=rows: describe_rows(self.store, r[i], when)

    def batches(self, start_step: int, stop_step: int, resume: dict | None = None) -> BatchLoader:
        return BatchLoader(self.store, self.order, self.cfg.batch_size, self.env.rank, self.env.world_size,
                           start_step, stop_step, self.env.device, self.cfg.prefetch, dtype=self.dtype)

    def close(self) -> None:
        pass


def open_store(cfg: TrainConfig, logger=None) -> ActivationStore:
    """cfg's chosen shards, after checking the manifest, each chosen shard against it, and the flags it must
    match. Training reads them less the held-out slice (held_out.split_store)."""
    store = ActivationStore(cfg.data_dir, cfg.num_shards,
                            expect={"target_layer": cfg.target_layer, "d_model": cfg.d_model})
    writer = active_writer(cfg.data_dir)
    if writer is not None and logger is not None:
        logger.warning("a collector is still writing %s (%s): training reads the %d shards it holds now",
                       cfg.data_dir, writer, len(store.shards))
    return store


def planned_steps(cfg: TrainConfig, store: ActivationStore | None, world_size: int) -> int:
    """The run's length, known before any model loads: --max_steps for --model, else the store's batches
    (per epoch of the shuffle, or one pass in the buffered order), capped by --max_steps."""
    if store is None:
        return cfg.max_steps
    batches = check_batch_size(store.total_tokens, cfg.batch_size, world_size)
    epochs = 1 if cfg.buffer_tokens is not None else cfg.epochs
    return min(epochs * batches, cfg.max_steps or math.inf)


def open_source(cfg: TrainConfig, env: DistEnv, dtype: torch.dtype, store: ActivationStore | None = None):
    """The source cfg names (module docstring); `store`: cfg's training shards already opened (without the
    held-out slice). `dtype`: what a float8 store's rows are decoded to (the compute dtype)."""
    from .held_out import split_store
    from .live import BufferedStoreSource, LiveSource

    if cfg.model is not None:
        return LiveSource(cfg, env)
    store = store if store is not None else split_store(cfg, open_store(cfg))[0]
    if cfg.buffer_tokens is not None:
        return BufferedStoreSource(store, cfg, env)
    return StoreSource(store, cfg, env, dtype)
