"""Asynchronous shard writer: device activations -> preallocated (pinned) host buffers -> shard files.

Pipeline, so the GPU never waits for the disk:
  1. `append` copies a batch's kept rows [n, d_model] into the filling host buffer on a side CUDA
     stream (non_blocking; the buffer is page-locked so the copy is a real DMA), ordered after the
     forward by `wait_stream`;
  2. `close_shard` records an event on that stream and queues the buffer for the writer thread, then
     takes the next buffer from the free list (blocking only when every buffer is in flight);
  3. the writer thread waits on the event, writes the shard under a temporary name, renames it,
     rewrites the manifest, and returns the buffer to the free list.
On CPU the same pipeline runs with plain buffers, a synchronous copy and no events.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from dataclasses import dataclass

import torch

from .store import shard_name, write_manifest, write_shard

logger = logging.getLogger(__name__)

# Test hook: SIGKILL this process right after the manifest lists this many shards (a crash mid-run).
CRASH_ENV = "SAETRON_COLLECT_CRASH_AFTER_SHARDS"


@dataclass
class HostBuffer:
    """Room for one shard: `capacity` rows."""

    activations: torch.Tensor  # [capacity, d_model], stored dtype
    token_ids: torch.Tensor  # [capacity] int32
    positions: torch.Tensor  # [capacity] int32
    rows: int = 0

    @classmethod
    def allocate(cls, capacity: int, d_model: int, dtype: torch.dtype, pin: bool) -> HostBuffer:
        def empty(*shape, dtype):
            return torch.empty(*shape, dtype=dtype, pin_memory=pin)

        return cls(empty(capacity, d_model, dtype=dtype), empty(capacity, dtype=torch.int32),
                   empty(capacity, dtype=torch.int32))


class ShardWriter:
    """Fills host buffers from `append` and writes each closed one as the next shard of `manifest`."""

    def __init__(self, output_dir: str, manifest: dict, capacity: int, d_model: int, dtype: torch.dtype,
                 device: torch.device, num_buffers: int = 3):
        self.output_dir, self.manifest = output_dir, manifest
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
        if self._error is not None:
            raise RuntimeError(f"the shard writer failed: {self._error}") from self._error

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
        if activations.is_cuda:
            stream = self._streams.get(activations.device)
            if stream is None:
                stream = self._streams[activations.device] = torch.cuda.Stream(activations.device)
            stream.wait_stream(torch.cuda.current_stream(activations.device))  # after the forward
            with torch.cuda.stream(stream):
                buf.activations[lo:hi].copy_(activations, non_blocking=True)
            activations.record_stream(stream)  # its memory is not reused before the copy ends
        else:
            buf.activations[lo:hi].copy_(activations)
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
        index, n = len(self.manifest["shards"]), buf.rows
        name = shard_name(index)
        self.bytes_written += write_shard(
            os.path.join(self.output_dir, name), buf.activations[:n], buf.token_ids[:n],
            buf.positions[:n], self.manifest,
        )
        self.manifest["shards"].append({"file": name, "tokens": n})
        self.manifest["total_tokens"] += n
        self.manifest["stream_state"] = stream_state
        write_manifest(self.output_dir, self.manifest)
        logger.debug("wrote %s: %d tokens", name, n)
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
