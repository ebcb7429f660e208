"""The activation-store reader: memory-mapped shards, a seeded cross-shard shuffle, per-rank batches.

The store (DESIGN.md) is a folder with manifest.json and shard_*.safetensors, each shard holding
`activations [N, d_model]`. Shards are memory-mapped (the safetensors header gives each tensor's
byte range); rows are read only when a batch needs them.

Order. Rows are cut into chunks of CHUNK_ROWS consecutive rows; each epoch permutes the chunks
(seed, epoch), groups them into buffers of ~`shuffle_buffer` rows, and permutes the rows inside each
buffer (seed, epoch, buffer). The concatenation is the epoch's row stream; global batch j is stream
rows [j*B, (j+1)*B) and rank r reads its slice [r*B/W, (r+1)*B/W). The stream depends on the seed and
the store only, not on the number of ranks, so W ranks see the same global batches as one process, and
step s is batch s % batches_per_epoch of epoch s // batches_per_epoch: a resume needs the step alone.
The rows of an epoch that do not fill a last batch are skipped (a different few each epoch).
"""

from __future__ import annotations

import json
import logging
import queue
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

STORE_FORMAT, STORE_FORMAT_VERSION = "saetron-activations", 1
CHUNK_ROWS = 1024  # consecutive rows kept together: ~1 MiB reads at d_model 576 bf16, yet fine-grained mixing
# safetensors dtype -> numpy dtype of the memmap, torch dtype of the rows (bf16 has no numpy dtype:
# it is mapped as int16 and viewed as bfloat16, bit for bit).
DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
          "BF16": (np.int16, torch.bfloat16)}


def read_manifest(data_dir: str | Path) -> dict:
    """The validated manifest of a store; a missing or foreign one is a ValueError saying what to do."""
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if not data_dir.is_dir():
        raise ValueError(f"--data_dir {str(data_dir)!r} is not a folder: expected an activation store "
                         "(manifest.json + shard_*.safetensors); run saetron-collect first or fix the path")
    if not path.is_file():
        found = sorted(p.name for p in data_dir.iterdir())[:5]
        raise ValueError(f"no manifest.json in {str(data_dir)!r} (found {found or 'nothing'}): expected an "
                         "activation store written by saetron-collect; run it first or fix --data_dir")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the store is damaged, collect it again") from e
    got = (manifest.get("format"), manifest.get("format_version"))
    if got != (STORE_FORMAT, STORE_FORMAT_VERSION):
        raise ValueError(f"{path}: expected format {STORE_FORMAT!r} version {STORE_FORMAT_VERSION}, got "
                         f"{got[0]!r} version {got[1]!r}; collect the activations again with this saetron")
    missing = [k for k in ("d_model", "dtype", "shards", "target_layer") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; the store is damaged, collect it again")
    if not manifest["shards"]:
        raise ValueError(f"{path} lists no shards: the collection wrote nothing yet; let it finish first")
    return manifest


def open_shard(path: Path, tokens: int, d_model: int) -> tuple[np.memmap, torch.dtype]:
    """Memory-map `activations` of one shard after checking it is complete and has the manifest's shape."""
    if not path.is_file():
        raise ValueError(f"shard {path} listed in the manifest is missing; the store is incomplete: "
                         "collect it again, or pass --num_shards to read only the shards before it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        header = f.read(n) if n is not None and n < size else b""
    try:
        meta = json.loads(header)
        info = meta["activations"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise ValueError(f"shard {path} ({size} bytes) has no readable safetensors header with "
                         "`activations`: it is truncated or not a shard; collect it again") from None
    begin, end = 8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1]
    if info["dtype"] not in DTYPES:
        raise ValueError(f"shard {path}: activations dtype {info['dtype']} not in {sorted(DTYPES)}")
    np_dtype, torch_dtype = DTYPES[info["dtype"]]
    if info["shape"] != [tokens, d_model]:
        raise ValueError(f"shard {path}: activations have shape {info['shape']}, the manifest says "
                         f"[{tokens}, {d_model}]; the store is inconsistent, collect it again")
    needed = 8 + n + max(t["data_offsets"][1] for k, t in meta.items() if k != "__metadata__")
    if size != needed or end - begin != tokens * d_model * np.dtype(np_dtype).itemsize:
        raise ValueError(f"shard {path} is truncated: {size} bytes on disk, its header needs {needed}; "
                         "collect it again, or pass --num_shards to read only the shards before it")
    return np.memmap(path, dtype=np_dtype, mode="r", offset=begin, shape=(tokens, d_model)), torch_dtype


class ActivationStore:
    """The first `num_shards` shards of a store, memory-mapped, addressed by global row id."""

    def __init__(self, data_dir: str | Path, num_shards: int | None = None,
                 target_layer: int | None = None, d_model: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = m = read_manifest(self.data_dir)
        for name, expected in (("target_layer", target_layer), ("d_model", d_model)):
            if expected is not None and expected != m[name]:
                raise ValueError(f"--{name} {expected} does not match the store's manifest {name} {m[name]} "
                                 f"({self.data_dir / 'manifest.json'}); fix --{name} or --data_dir")
        shards = m["shards"]
        if num_shards is not None and num_shards > len(shards):
            raise ValueError(f"--num_shards {num_shards} but the store has {len(shards)} shards; "
                             f"pass at most {len(shards)} (or omit it to read all)")
        shards = shards[: num_shards or len(shards)]
        self.d_model = int(m["d_model"])
        opened = [open_shard(self.data_dir / s["file"], int(s["tokens"]), self.d_model) for s in shards]
        self.shards = [mm for mm, _ in opened]
        self.dtype = opened[0][1]
        self.starts = np.cumsum([0] + [mm.shape[0] for mm in self.shards])  # [num_shards + 1]
        self.total_tokens = int(self.starts[-1])

    def gather(self, rows: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Copy global rows [n] (int64) into out [n, d_model] (store dtype), in the order given."""
        out_np = out.view(torch.int16).numpy() if out.dtype == torch.bfloat16 else out.numpy()
        shard = np.searchsorted(self.starts, rows, side="right") - 1  # [n]
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = rows[where] - self.starts[s]
            order = np.argsort(local, kind="stable")  # ascending offsets: sequential page reads
            out_np[where[order]] = self.shards[s][local[order]]
        return out


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

    Iterating yields x [batch_size // world_size, d_model] on `device` (store dtype). On CUDA the
    thread fills pinned buffers and the copy to the GPU is non_blocking. `wait_seconds` sums the time
    the consumer waited for a batch: what loading costs the training loop.
    """

    def __init__(self, store: ActivationStore, order: ShuffleOrder, batch_size: int, rank: int,
                 world_size: int, start_step: int, stop_step: int, device: torch.device, prefetch: int = 4):
        self.batches_per_epoch = check_batch_size(store.total_tokens, batch_size, world_size)
        self.store, self.order, self.device = store, order, device
        self.batch_size, self.local = batch_size, batch_size // world_size
        self.offset = rank * self.local
        self.steps = range(start_step, stop_step)
        self.pin = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._produce, name="saetron-batch-loader", daemon=True)

    def read(self, step: int) -> torch.Tensor:
        """This rank's rows of global batch `step`, on the CPU (pinned on CUDA)."""
        epoch, j = divmod(step, self.batches_per_epoch)
        start = j * self.batch_size + self.offset
        rows = self.order.rows(epoch, start, start + self.local)
        out = torch.empty(self.local, self.store.d_model, dtype=self.store.dtype, pin_memory=self.pin)
        return self.store.gather(rows, out)

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
                if isinstance(item, BaseException):
                    raise RuntimeError(f"reading the activation store failed: {item}") from item
                yield item.to(self.device, non_blocking=True)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


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
                  rows_per_read: int = 65536) -> Iterator[torch.Tensor]:
    """The first `tokens` rows of epoch 0's stream (all of them if fewer), identical on every rank."""
    total = min(tokens, store.total_tokens)
    for start in range(0, total, rows_per_read):
        rows = order.rows(0, start, min(start + rows_per_read, total))
        yield store.gather(rows, torch.empty(len(rows), store.d_model, dtype=store.dtype))
