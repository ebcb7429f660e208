"""The trainer's reading of an activation store: a seeded cross-shard shuffle and per-rank batches.

The store's format, its checks and its memory-mapped reader (`ActivationStore`, rows read only when a
batch needs them) are saetron.collect.store's, shared with the collector and the evaluation.

Order. Rows are cut into chunks of CHUNK_ROWS consecutive rows; each epoch permutes the chunks
(seed, epoch), groups them into buffers of ~`shuffle_buffer` rows, and permutes the rows inside each
buffer (seed, epoch, buffer). The concatenation is the epoch's row stream; global batch j is stream
rows [j*B, (j+1)*B) and rank r reads its slice [r*B/W, (r+1)*B/W). The stream depends on the seed and
the store only, not on the number of ranks, so W ranks see the same global batches as one process, and
step s is batch s % batches_per_epoch of epoch s // batches_per_epoch: a resume needs the step alone.
The rows of an epoch that do not fill a last batch are skipped (a different few each epoch).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

from saetron.collect import fp8
from saetron.collect.store import ActivationStore

logger = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # consecutive rows kept together: ~1 MiB reads at d_model 576 bf16, yet fine-grained mixing


class ShuffleOrder:
    """The seeded row stream of each epoch (module docstring): rows(epoch, start, stop) -> global ids."""

    def __init__(self, starts: np.ndarray, shuffle_buffer: int, seed: int) -> None:
        self.seed = seed
        self.chunks = np.array([(b, min(b + CHUNK_ROWS, e)) for s, e in zip(starts[:-1], starts[1:])
                                for b in range(int(s), int(e), CHUNK_ROWS)], dtype=np.int64)  # [C, 2]
        self.chunks_per_buffer = max(1, shuffle_buffer // CHUNK_ROWS)
        self._epoch, self._buffers = None, {}

    def _layout(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        self._chunks = self.chunks[perm]
        sizes = self._chunks[:, 1] - self._chunks[:, 0]
        ends = np.cumsum(sizes)[self.chunks_per_buffer - 1 :: self.chunks_per_buffer]
        self._bounds = np.unique(np.concatenate([[0], ends, [sizes.sum()]]))  # buffer row bounds
        self._epoch, self._buffers = epoch, {}

    def _buffer(self, i: int) -> np.ndarray:
        if i not in self._buffers:
            chunks = self._chunks[i * self.chunks_per_buffer : (i + 1) * self.chunks_per_buffer]
            rows = np.concatenate([np.arange(b, e) for b, e in chunks])
            rng = np.random.default_rng([self.seed, self._epoch, i])
            kept = {j: b for j, b in self._buffers.items() if j == i - 1}  # a batch may span two buffers
            self._buffers = {**kept, i: rows[rng.permutation(len(rows))]}
        return self._buffers[i]

    def rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        self._layout(epoch)
        first = int(np.searchsorted(self._bounds, start, side="right")) - 1
        parts, i = [], first
        while self._bounds[i] < stop:
            lo = max(start, self._bounds[i]) - self._bounds[i]
            parts.append(self._buffer(i)[lo : stop - self._bounds[i]])
            i += 1
        return np.concatenate(parts)


class BatchLoader:
    """This rank's part of global batches [start_step, stop_step), read ahead by a thread.

    Iterating yields x [batch_size // world_size, d_model] on `device` (store dtype; a float8 store's rows
    are read as stored, half the bytes of bfloat16, and decoded on `device` to `dtype`). On CUDA the
    thread fills pinned buffers and the copy to the GPU is non_blocking. `wait_seconds` sums the time
    the consumer waited for a batch: what loading costs the training loop.
    """

    def __init__(self, store: ActivationStore, order: ShuffleOrder, batch_size: int, rank: int,
                 world_size: int, start_step: int, stop_step: int, device: torch.device, prefetch: int = 4,
                 dtype: torch.dtype | None = None):
        self.batches_per_epoch = check_batch_size(store.total_tokens, batch_size, world_size)
        self.store, self.order, self.device = store, order, device
        self.batch_size, self.local = batch_size, batch_size // world_size
        self.offset = rank * self.local
        self.steps = range(start_step, stop_step)
        self.pin = device.type == "cuda"
        self.dtype = dtype or store.dtype  # of a float8 store's decoded rows
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._produce, name="saetron-batch-loader", daemon=True)

    def rows(self, step: int) -> np.ndarray:
        """The global row ids [batch_size // world_size] of this rank's part of batch `step`, in order."""
        epoch, j = divmod(step, self.batches_per_epoch)
        start = j * self.batch_size + self.offset
        return self.order.rows(epoch, start, start + self.local)

    def read(self, step: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of global batch `step`, on the CPU (pinned on CUDA); a float8 store's as stored:
        (codes [b, d_model] uint8, scales [b] float32)."""
        if self.store.scaled:
            codes = torch.empty(self.local, self.store.d_model, dtype=torch.uint8, pin_memory=self.pin)
            scales = torch.empty(self.local, dtype=torch.float32, pin_memory=self.pin)
            self.store.gather_encoded(self.rows(step), codes, scales)
            return codes, scales
        out = torch.empty(self.local, self.store.d_model, dtype=self.store.dtype, pin_memory=self.pin)
        return self.store.gather(self.rows(step), out)

    def _produce(self) -> None:
        try:
            for step in self.steps:
                item = self.read(step)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it in the training thread
            self._queue.put(e)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._thread.start()
        try:
            for _ in self.steps:
                start = time.perf_counter()
                item = self._queue.get()
                self.wait_seconds += time.perf_counter() - start
                if isinstance(item, BaseException):  # raised as it is: its traceback shows where
                    raise item
                if isinstance(item, tuple):
                    codes, scales = (t.to(self.device, non_blocking=True) for t in item)
                    yield fp8.decode(codes, scales, self.dtype)
                else:
                    yield item.to(self.device, non_blocking=True)
        finally:
            self.close()

    def describe(self, step: int, rows: np.ndarray) -> str:
        """Names rows [k] (indices into this rank's batch `step`) in an error: shard and row."""
        return describe_rows(self.store, self.rows(step)[rows], f"step {step}")

    def state(self, step: int) -> None:
        """Nothing: the step alone fixes the data position."""
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def describe_rows(store: ActivationStore, rows: np.ndarray, when: str) -> str:
    """`shard_00001.safetensors row 17, ... and 4 more (step 12)` for global row ids [k] (up to 3 named)."""
    named = ", ".join(f"{shard.path.name} row {row}" for shard, row in map(store.locate, rows[:3].tolist()))
    return f"{named}{f' and {len(rows) - 3} more' if len(rows) > 3 else ''} ({when})"


def check_batch_size(total_tokens: int, batch_size: int, world_size: int) -> int:
    """Batches per epoch, after checking the global batch splits over the ranks and fits in the data."""
    if batch_size % world_size:
        raise ValueError(f"--batch_size {batch_size} is the global batch; it must divide by the "
                         f"{world_size} ranks: use a multiple of {world_size}")
    if batch_size > total_tokens:
        raise ValueError(f"--batch_size {batch_size} exceeds the {total_tokens} tokens of the chosen "
                         "shards; use a smaller batch or more shards")
    return total_tokens // batch_size


def stats_batches(store: ActivationStore, order: ShuffleOrder, tokens: int,
                  rows_per_read: int = 65536) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The first `tokens` rows of epoch 0's stream (all of them if fewer), identical on every rank, as
    (global row ids [n], activations [n, d_model]) pairs."""
    total = min(tokens, store.total_tokens)
    for start in range(0, total, rows_per_read):
        rows = order.rows(0, start, min(start + rows_per_read, total))
        yield rows, store.gather(rows, torch.empty(len(rows), store.d_model, dtype=store.dtype))
