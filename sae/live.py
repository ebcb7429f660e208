"""Training straight from the model: the collector's hooked forwards as a resumable row stream, and the two
buffered sources (sae/buffer.py) of the trainer: the model (--model) and a store read in the same order
(--data_dir with --buffer_tokens).

The rows are the collector's, made by its code: the packing (packing.BatchProducer: windows of
context_size tokens, each from BOS), the hook (model.LayerHook), the kept rows (packing.kept_rows: no BOS,
special token or position 0 unless keep_special_tokens) and the rule for a row with a NaN or Inf (its
L2 norm, store.row_norms, is not finite: left out, with a warning; the collector counts it in the
manifest). A store collected with the same model, layer, hook point, context size, windows per forward
(the collector's --batch_size = --model_batch_size here) and text holds exactly these rows in this order,
so training from it with --buffer_tokens equals training from the model, batch for batch.

Text shards. Under torchrun each rank runs its own forward on its own shard of the text: rank r of W reads
documents r, r + W, r + 2W, ... of the dataset (packing.iter_windows' text_shard), packs them into windows
and fills its own buffers (stream_index r); global batch j is the W ranks' batches j together. A resume
needs the same W. The statistics pass reads the first ceil(stats_tokens / W) rows of each rank's
training stream (at most a buffer), gathered in rank order, so every rank estimates the same mean.

A chunk of the model's row stream is one forward batch; its position is {"stream_state": S}, S the
packing stream state before the batch (None: the start), from which BatchProducer yields it first. A
chunk of a store's is {"row": r}, its first global row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from saetron.collect.data import open_text_stream
from saetron.collect.model import LayerHook, LoadedModel, load_model
from saetron.collect.packing import BatchProducer, kept_rows
from saetron.collect.store import ActivationStore, row_norms

from .buffer import BufferedBatches, Chunk, OpenRows
from .data import check_batch_size
from .distributed import DistEnv
from .held_out import live_eval_tokens
from .train_config import DEFAULT_BUFFER_TOKENS, TrainConfig

logger = logging.getLogger(__name__)

ROWS_PER_READ = 65536  # rows of a store read at a time in store order
BUFFER_SHARE = 0.25  # the two buffers go on the GPU when they take at most this share of its free memory


def model_rows(loaded: LoadedModel, cfg: TrainConfig, text_shard: tuple[int, int]) -> OpenRows:
    """The row stream of the model's forwards over this rank's text shard: chunks of kept rows [n, d_model]
    on the model's device, one per forward batch of cfg.model_batch_size windows."""

    def open_rows(position: dict | None) -> Iterator[Chunk]:
        state = None if position is None else position["stream_state"]
        producer = BatchProducer(
            open_text_stream(cfg.dataset, cfg.split, cfg.dataset_config), loaded.tokenizer, cfg.context_size,
            cfg.model_batch_size, cfg.text_field, cfg.keep_special_tokens, state,
            pin=loaded.device.type == "cuda", text_shard=text_shard,
        )
        try:
            with LayerHook(loaded.layers, cfg.target_layer, cfg.hook_point) as hook:
                for batch in producer:
                    activations = hook.run(loaded.model, batch.input_ids.to(loaded.device, non_blocking=True))
                    rows = kept_rows(activations, batch.keep_idx.to(activations.device, non_blocking=True))
                    finite = torch.isfinite(row_norms(rows))  # [n]
                    if not bool(finite.all()):  # synchronizes this (the producer's) stream only
                        logger.warning("left out %d row(s) of a forward batch whose activations hold a "
                                       "NaN or Inf", int((~finite).sum()))
                        rows = rows[finite]
                    yield rows, {"stream_state": state}
                    state = batch.stream_state
        finally:
            producer.close()

    return open_rows


def store_rows(store: ActivationStore) -> OpenRows:
    """The row stream of a store in store order: chunks of up to ROWS_PER_READ rows (store.dtype, CPU)."""

    def open_rows(position: dict | None) -> Iterator[Chunk]:
        for start in range(0 if position is None else position["row"], store.total_tokens, ROWS_PER_READ):
            stop = min(start + ROWS_PER_READ, store.total_tokens)
            rows = torch.empty(stop - start, store.d_model, dtype=store.dtype)
            yield store.gather(np.arange(start, stop), rows), {"row": start}

    return open_rows


def buffer_device(device: torch.device, rows: int, d_model: int, dtype: torch.dtype) -> torch.device:
    """Where the two buffers of `rows` rows go: the GPU when they fit in BUFFER_SHARE of its free memory
    (measured once the model is loaded), else (pinned) host memory."""
    if device.type != "cuda":
        return device
    need = 2 * rows * d_model * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    where = device if need <= BUFFER_SHARE * free else torch.device("cpu")
    logger.info("live buffers: 2 x %d rows, %.2f GB, in %s (%.1f GB free on %s)", rows, need / 1e9,
                "GPU memory" if where.type == "cuda" else "pinned host memory", free / 1e9, device)
    return where


class _Buffered:
    """What the two buffered sources share: the loader made for the statistics pass is the one
    training starts with (its first buffer is not computed twice)."""

    stream_index: int
    batch_rows: int
    offset: int

    def __init__(self, cfg: TrainConfig, env: DistEnv, d_model: int, dtype: torch.dtype) -> None:
        self.cfg, self.env, self.d_model, self.dtype = cfg, env, d_model, dtype
        self.buffer_rows = cfg.buffer_tokens or DEFAULT_BUFFER_TOKENS
        self.local = cfg.batch_size // env.world_size
        self.where = buffer_device(env.device, self.buffer_rows, d_model, dtype)
        self._fresh: BufferedBatches | None = None

    def open_rows(self) -> OpenRows:
        raise NotImplementedError

    def stream_name(self) -> str:
        raise NotImplementedError

    def batches(self, start_step: int, stop_step: int, resume: dict | None = None) -> BufferedBatches:
        if self._fresh is not None:
            fresh, self._fresh = self._fresh, None
            if start_step == 0 and resume is None:
                return fresh
            fresh.close()  # a resumed run: the statistics pass's loader starts elsewhere
        return BufferedBatches(self.open_rows(), self.d_model, self.dtype, self.buffer_rows, self.cfg.seed,
                               self.stream_index, self.batch_rows, self.offset, self.local, start_step,
                               stop_step, self.env.device, self.where, resume, self.stream_name())

    def first_rows(self, n: int, stop_step: int) -> torch.Tensor:
        """The first n rows of this rank's training stream (n <= the buffer), from the loader training
        starts with."""
        self._fresh = self.batches(0, stop_step)
        return self._fresh.peek(n)

    def close(self) -> None:
        if self._fresh is not None:
            self._fresh.close()


class LiveSource(_Buffered):
    """Batches straight from the model (--model): this rank's forwards over its text shard, buffered.

    Held out (N = held_out.live_eval_tokens: --eval_tokens or its default): the first forward batches of
    each rank's text shard holding at least ceil(N / W) rows are left out of training, whose stream starts
    at the forward batch after them (`start`); rank 0 keeps its own (`held`: float32 rows on the CPU) and
    evaluates them at the end. A resume runs those forwards again (the
    text and the model are the same).
    """

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        check_batch_size(cfg.batch_size, cfg.batch_size, env.world_size)  # the batch splits over the ranks
        self.loaded = load_model(cfg.model, cfg.target_layer, cfg.model_dtype, device=str(env.device))
        super().__init__(cfg, env, self.loaded.d_model, self.loaded.dtype)
        self.stream_index, self.batch_rows, self.offset = env.rank, self.local, 0
        self.target_layer = cfg.target_layer
        # What a store collected with these settings records, for the SAE's export.
        self.manifest = {"model": cfg.model, "target_layer": cfg.target_layer, "hook_point": cfg.hook_point,
                         "context_size": cfg.context_size, "dataset": cfg.dataset}
        self.eval_tokens = live_eval_tokens(cfg)
        self.held, self.start = self._hold_out(math.ceil(self.eval_tokens / env.world_size))

    def _hold_out(self, rows: int) -> tuple[list[torch.Tensor], dict | None]:
        """(the first chunks of this rank's stream holding >= rows rows, float32 on the CPU; the position of
        the chunk after them, where training starts: None for the stream's start)."""
        if rows == 0:
            return [], None
        held, got = [], 0
        chunks = model_rows(self.loaded, self.cfg, (self.env.rank, self.env.world_size))(None)
        try:
            for x, position in chunks:
                if got >= rows:
                    return held, position
                if self.env.is_main:  # rank 0 evaluates them; the other ranks only skip theirs
                    held.append(x.float().cpu())
                got += len(x)
        finally:
            chunks.close()
        raise ValueError(f"--eval_tokens {self.eval_tokens}: {self.stream_name()} holds {got} rows, not "
                         f"more than the {rows} held out on this rank; pass a smaller --eval_tokens or more "
                         "text")

    def open_rows(self) -> OpenRows:
        rows = model_rows(self.loaded, self.cfg, (self.env.rank, self.env.world_size))
        return lambda position: rows(position if position is not None else self.start)

    def stream_name(self) -> str:
        shard = f" (documents {self.env.rank} mod {self.env.world_size})" if self.env.world_size > 1 else ""
        return f"the text of {self.cfg.dataset}{shard}"

    def total_steps(self) -> int:
        return self.cfg.max_steps

    def identity(self) -> dict:
        """What a resume must match besides the trainer's settings: the rows' source and the text shards."""
        keys = ("model", "dataset", "dataset_config", "split", "text_field", "target_layer", "hook_point",
                "context_size", "model_batch_size", "model_dtype", "keep_special_tokens")
        return {**{k: getattr(self.cfg, k) for k in keys}, "buffer_rows": self.buffer_rows,
                "revision": self.loaded.revision, "world_size": self.env.world_size,
                **({"eval_tokens": self.eval_tokens} if self.eval_tokens else {})}

    def describe(self) -> str:
        return (f"live: {self.cfg.model} layer {self.cfg.target_layer} {self.cfg.hook_point}, d_model "
                f"{self.d_model}, over {self.stream_name()}, buffers of {self.buffer_rows} rows")

    def stats_batches(self, tokens: int, stop_step: int) -> Iterator[tuple[torch.Tensor, object]]:
        n = min(math.ceil(tokens / self.env.world_size), self.buffer_rows)
        x = self.first_rows(n, stop_step)  # [n, d_model]
        if self.env.world_size > 1:  # the same rows, hence the same mean, on every rank
            parts = [torch.empty_like(x) for _ in range(self.env.world_size)]
            dist.all_gather(parts, x)
            x = torch.cat(parts)
        for start in range(0, len(x), ROWS_PER_READ):
            yield x[start:start + ROWS_PER_READ], lambda i, s=start: (
                f"rows {', '.join(str(s + int(r)) for r in i[:3])} of the first rows of the live stream "
                "(the statistics pass before step 0)")


class BufferedStoreSource(_Buffered):
    """A store read once in the buffered order of live training (--data_dir with --buffer_tokens): one
    stream every rank slices, so the batches equal a one-rank --model run's on the same rows."""

    def __init__(self, store: ActivationStore, cfg: TrainConfig, env: DistEnv) -> None:
        super().__init__(cfg, env, store.d_model, store.dtype)
        self.store, self.manifest = store, store.manifest
        self.target_layer = store.manifest["target_layer"]
        self.stream_index, self.batch_rows, self.offset = 0, cfg.batch_size, env.rank * self.local

    def open_rows(self) -> OpenRows:
        return store_rows(self.store)

    def stream_name(self) -> str:
        return f"the store {self.cfg.data_dir}"

    def total_steps(self) -> int:
        steps = check_batch_size(self.store.total_tokens, self.cfg.batch_size, self.env.world_size)
        return min(steps, self.cfg.max_steps or steps)

    def identity(self) -> dict:
        return {"total_tokens": self.store.total_tokens, "buffer_rows": self.buffer_rows}

    def describe(self) -> str:
        return (f"store {self.cfg.data_dir}: {self.store.total_tokens} tokens in {len(self.store.shards)} "
                f"shards, d_model {self.d_model}, read in order in buffers of {self.buffer_rows} rows")

    def stats_batches(self, tokens: int, stop_step: int) -> Iterator[tuple[torch.Tensor, object]]:
        x = self.first_rows(min(tokens, self.buffer_rows, self.store.total_tokens), stop_step)
        for start in range(0, len(x), ROWS_PER_READ):
            yield x[start:start + ROWS_PER_READ], lambda i, s=start: (
                f"training-stream rows {', '.join(str(s + int(r)) for r in i[:3])} of {self.stream_name()} "
                "(the statistics pass before step 0)")
