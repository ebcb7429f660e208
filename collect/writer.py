"""Asynchronous shard writer: device activations -> preallocated (pinned) host buffers -> shard files.

Pipeline, so the GPU never waits for the disk:
  1. `append` copies a batch's kept rows [n, d_model] into the filling host buffer on a side CUDA
     stream (non_blocking; the buffer is page-locked so the copy is a real DMA), ordered after the
     forward by `wait_stream`;
  2. `close_shard` records an event on that stream and queues the buffer for the writer thread, then
     takes the next buffer from the free list (blocking only when every buffer is in flight);
  3. the writer thread waits on the event, leaves out the rows whose norm is not finite (NaN/Inf:
     counted in the shard's entry and logged with their tokens), writes the shard under a temporary
     name, renames it, rewrites the manifest, and returns the buffer to the free list.
Each row's L2 norm is computed where the activations are (the GPU) and travels with them: the
manifest's per-shard norm statistics and the non-finite check cost the writer thread no pass over
the activations. On CPU the same pipeline runs with plain buffers, a synchronous copy and no events.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .store import row_norms, shard_name, write_shard

logger = logging.getLogger(__name__)

# Test hook: SIGKILL this process right after the manifest lists this many shards (a crash mid-run).
CRASH_ENV = "SAETRON_COLLECT_CRASH_AFTER_SHARDS"


@dataclass
class HostBuffer:
    """Room for one shard: `capacity` rows."""

    activations: torch.Tensor  # [capacity, d_model], stored dtype
    token_ids: torch.Tensor  # [capacity] int32
    positions: torch.Tensor  # [capacity] int32
    norms: torch.Tensor  # [capacity] float32, L2 norm of each row
    rows: int = 0

    @classmethod
    def allocate(cls, capacity: int, d_model: int, dtype: torch.dtype, pin: bool) -> HostBuffer:
        def empty(*shape, dtype):
            return torch.empty(*shape, dtype=dtype, pin_memory=pin)

        return cls(empty(capacity, d_model, dtype=dtype), empty(capacity, dtype=torch.int32),
                   empty(capacity, dtype=torch.int32), empty(capacity, dtype=torch.float32))


class ShardWriter:
    """Fills host buffers from `append` and writes each closed one as the next shard of `manifest`.

    `describe_token(token_id) -> str` names a token in the warning about non-finite rows (the
    collector passes the tokenizer's decode); `nonfinite_rows` counts the rows left out so far.
    """

    def __init__(self, output_dir: str, manifest: dict, capacity: int, d_model: int, dtype: torch.dtype,
                 device: torch.device, num_buffers: int = 3,
                 describe_token: Callable[[int], str] = lambda token_id: f"id {token_id}"):
        self.output_dir, self.manifest = output_dir, manifest
        self.describe_token = describe_token
        self.nonfinite_rows = 0
        self.cuda = device.type == "cuda"
        self._free: queue.Queue = queue.Queue()
        for _ in range(num_buffers):
            self._free.put(HostBuffer.allocate(capacity, d_model, dtype, pin=self.cuda))
        self._pending: queue.Queue = queue.Queue()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._current: HostBuffer | None = None
        self._error: BaseException | None = None
        self.bytes_written = 0
        self._crash_after = int(os.environ.get(CRASH_ENV, "0"))
        self._thread = threading.Thread(target=self._write_loop, name="saetron-writer", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> int:
        """Rows in the shard being filled."""
        return self._current.rows if self._current is not None else 0

    def _check(self) -> None:
        if self._error is not None:  # raised again as it is: its traceback shows where it happened
            raise self._error

    def _take_free(self) -> HostBuffer:
        while True:
            self._check()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def append(self, activations: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Queue rows for the current shard: `activations [n, d_model]` on any device, ids/positions [n]."""
        if self._current is None:
            self._current = self._take_free()
        buf, n = self._current, activations.shape[0]
        lo, hi = buf.rows, buf.rows + n
        assert hi <= buf.activations.shape[0], "a shard buffer overflowed: capacity < shard_tokens + batch"
        norms = row_norms(activations)  # [n] float32, on the activations' device
        if activations.is_cuda:
            stream = self._streams.get(activations.device)
            if stream is None:
                stream = self._streams[activations.device] = torch.cuda.Stream(activations.device)
            stream.wait_stream(torch.cuda.current_stream(activations.device))  # after the forward
            with torch.cuda.stream(stream):
                buf.activations[lo:hi].copy_(activations, non_blocking=True)
                buf.norms[lo:hi].copy_(norms, non_blocking=True)
            activations.record_stream(stream)  # its memory is not reused before the copy ends
            norms.record_stream(stream)
        else:
            buf.activations[lo:hi].copy_(activations)
            buf.norms[lo:hi].copy_(norms)
        buf.token_ids[lo:hi] = token_ids
        buf.positions[lo:hi] = positions
        buf.rows = hi

    def close_shard(self, stream_state: dict) -> None:
        """Hand the current shard to the writer thread; `stream_state` resumes right after it."""
        self._check()
        if self._current is None or self._current.rows == 0:
            return
        events = []
        for stream in self._streams.values():
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        self._pending.put((self._current, events, stream_state))
        self._current = None

    def _write_loop(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            buf, events, stream_state = item
            try:
                for event in events:
                    event.synchronize()  # the device-to-host copies into buf are done
                self._write(buf, stream_state)
            except BaseException as error:  # reported to the main thread by _check
                self._error = error
                return
            buf.rows = 0
            self._free.put(buf)

    def _write(self, buf: HostBuffer, stream_state: dict) -> None:
        n, name = buf.rows, shard_name(len(self.manifest["shards"]))
        columns = (buf.activations[:n], buf.token_ids[:n], buf.positions[:n], buf.norms[:n])
        finite = torch.isfinite(columns[3])  # [n]
        dropped = n - int(finite.sum())
        if dropped:
            bad = (~finite).nonzero().squeeze(1)[:5].tolist()
            tokens = ", ".join(f"{self.describe_token(int(buf.token_ids[i]))!r} at position "
                               f"{int(buf.positions[i])}" for i in bad)
            if dropped == n:
                raise RuntimeError(f"every one of the {n} rows of {name} has a NaN or Inf activation (e.g. "
                                   f"{tokens}): the model's forward is broken at this layer; try --dtype "
                                   "float32 or another --target_layer")
            logger.warning("%s: left out %d row(s) of %d whose activations hold a NaN or Inf: %s%s", name,
                           dropped, n, tokens, ", ..." if dropped > len(bad) else "")
            columns = tuple(column[finite] for column in columns)
            self.nonfinite_rows += dropped
        self.bytes_written += write_shard(self.output_dir, self.manifest, *columns, stream_state, dropped)
        logger.debug("wrote %s: %d tokens", name, n - dropped)
        if self._crash_after and len(self.manifest["shards"]) >= self._crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self, stream_state: dict) -> None:
        """Close the last (partial) shard, wait for every write, and raise any writer error."""
        self.close_shard(stream_state)
        self._pending.put(None)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop after the shards already queued (on an error in the main thread)."""
        self._current = None
        self._pending.put(None)
        self._thread.join()
