"""Asynchronous shard writer: each batch's kept rows of every hook site, device -> pinned host -> shards.

Pipeline, so that the forward never waits for the disk and the main thread never waits for the GPU:
  1. `append` takes a free slot (room for one batch: per site a device buffer and a pinned host buffer),
     gathers the kept rows into the slot's device buffer on the current stream (ordered after the forward),
     computes their L2 norms there (for a float8 store also the codes, scales and encoding errors: fp8.py),
     then copies the slot to its pinned host buffers on a side stream (non_blocking) and records an event.
     No host synchronization, no allocation per batch, no `record_stream`: the slot owns its memory.
  2. The writer thread waits on the slot's event, leaves out the rows whose norm is not finite (NaN/Inf:
     counted per shard in the manifest and logged with their tokens), appends the rest to each site's open
     ShardFile (written and flushed to disk as batches arrive, store.py) and puts the slot back on the free
     list. The main thread blocks only when every slot is in flight, i.e. when the disk is behind.
  3. `close_shard` queues a close: the writer thread completes each site's shard and rewrites its manifest,
     every site's shard file first, then every manifest.
On CPU the same pipeline runs with the gather straight into plain host buffers and no events.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import fp8
from .packing import kept_rows
from .store import ShardFile, row_norms

logger = logging.getLogger(__name__)

# Test hook: SIGKILL this process right after the manifest of every site lists N shards ("N"), or right
# after the manifest of site S lists N shards ("N.S", sites counted from 0): a crash mid-run.
CRASH_ENV = "SAETRON_COLLECT_CRASH_AFTER_SHARDS"


@dataclass
class SiteBuffers:
    """One batch of one site: rows [capacity, d_model] in the stored dtype (fp8 codes for a float8 store),
    their norms [capacity] float32, and for a float8 store scales and encoding errors [capacity] float32."""

    rows: torch.Tensor
    norms: torch.Tensor
    scales: torch.Tensor | None
    errors: torch.Tensor | None

    @classmethod
    def allocate(cls, capacity: int, d_model: int, dtype: torch.dtype, device: torch.device,
                 pin: bool) -> SiteBuffers:
        def empty(*shape, dtype=torch.float32):
            return torch.empty(*shape, dtype=dtype, device=device, pin_memory=pin)

        scaled = dtype == fp8.FP8
        return cls(empty(capacity, d_model, dtype=dtype), empty(capacity),
                   empty(capacity) if scaled else None, empty(capacity) if scaled else None)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.rows, self.norms, self.scales, self.errors) if t is not None]


@dataclass
class Slot:
    """A batch in flight: per site host buffers (pinned on CUDA) and, on CUDA, device buffers."""

    host: list[SiteBuffers]
    device: list[SiteBuffers | None]
    rows: int = 0
    token_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    events: list = field(default_factory=list)


class ShardWriter:
    """Writes the rows `append`ed for each site as the next shards of that site's store.

    `stores`: (folder, manifest) per site, in the order `append` gets their activations. `batch_rows`: the
    most rows one append brings; `shard_rows`: the most rows a shard holds (the collector closes a shard at
    the first batch end past shard_tokens). `dtype`: the stored dtype. `describe_token(token_id) -> str`
    names a token in the warning about non-finite rows; `nonfinite_rows` counts the rows left out so far.
    """

    def __init__(self, stores: Sequence[tuple[str, dict]], batch_rows: int, shard_rows: int, d_model: int,
                 dtype: torch.dtype, device: torch.device, num_buffers: int = 3,
                 describe_token: Callable[[int], str] = lambda token_id: f"id {token_id}"):
        self.stores = list(stores)
        self.batch_rows, self.shard_rows, self.d_model, self.dtype = batch_rows, shard_rows, d_model, dtype
        self.describe_token = describe_token
        self.cuda = device.type == "cuda"
        self.nonfinite_rows = 0
        self.rows = 0  # rows appended to the shard being filled (before any is left out)
        self._free: queue.Queue = queue.Queue()
        for _ in range(num_buffers):
            host = [SiteBuffers.allocate(batch_rows, d_model, dtype, torch.device("cpu"), self.cuda)
                    for _ in self.stores]
            self._free.put(Slot(host, [None] * len(self.stores)))
        self._pending: queue.Queue = queue.Queue()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._error: BaseException | None = None
        self._closed_bytes = 0
        # writer-thread state, per site: the open shard, rows left out of it, a few of their tokens
        self._shards: list[ShardFile | None] = [None] * len(self.stores)
        self._dropped = [0] * len(self.stores)
        self._dropped_tokens: list[list[str]] = [[] for _ in self.stores]
        crash = os.environ.get(CRASH_ENV, "")
        self._crash_after = tuple(int(v) for v in crash.split(".")) if crash else None
        self._thread = threading.Thread(target=self._write_loop, name="saetron-writer", daemon=True)
        self._thread.start()

    @property
    def bytes_written(self) -> int:
        """Bytes of the shards closed so far plus the rows already written to the open ones."""
        return self._closed_bytes + sum(s.bytes_appended for s in self._shards if s is not None)

    def _check(self) -> None:
        if self._error is not None:  # raised again as it is: its traceback shows where it happened
            raise self._error

    def _take_free(self) -> Slot:
        while True:
            self._check()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def append(self, activations: Sequence[torch.Tensor] | torch.Tensor, token_ids: torch.Tensor,
               positions: torch.Tensor, keep_idx: torch.Tensor | None = None) -> None:
        """Queue one batch for the current shards. `activations`: per site (in `stores`' order; a tensor for
        one site) either [B, T, d_model] activations with `keep_idx` [n] (host) selecting the kept rows of
        B*T (packing.kept_rows), or the rows [n, d_model] themselves; token_ids, positions [n] (host)."""
        if isinstance(activations, torch.Tensor):
            activations = [activations]
        assert len(activations) == len(self.stores), "one activations tensor per site"
        n = len(token_ids)
        assert n <= self.batch_rows, f"a batch of {n} rows, more than batch_rows {self.batch_rows}"
        slot = self._take_free()
        slot.rows, slot.token_ids, slot.positions, slot.events = n, token_ids, positions, []
        keep_on: dict[torch.device, torch.Tensor] = {}
        for i, site_activations in enumerate(activations):
            dev = site_activations.device
            if keep_idx is None:
                rows = site_activations.reshape(-1, self.d_model)  # [n, d_model]
            else:
                if dev not in keep_on:  # pinned on CUDA: an asynchronous copy
                    keep_on[dev] = keep_idx.to(dev, non_blocking=True)
                rows = None
            if dev.type == "cuda":
                if slot.device[i] is None or slot.device[i].rows.device != dev:
                    slot.device[i] = SiteBuffers.allocate(self.batch_rows, self.d_model, self.dtype, dev,
                                                          pin=False)
                self._fill(slot.device[i], site_activations, rows, keep_on.get(dev), n)
                stream = self._side_stream(dev)
                stream.wait_stream(torch.cuda.current_stream(dev))  # after the gather and norms
                with torch.cuda.stream(stream):
                    for host, staged in zip(slot.host[i].tensors(), slot.device[i].tensors()):
                        host[:n].copy_(staged[:n], non_blocking=True)
            else:
                self._fill(slot.host[i], site_activations, rows, keep_on.get(dev), n)
        for dev, stream in self._streams.items():
            if any(a.device == dev for a in activations):
                event = torch.cuda.Event()
                event.record(stream)
                slot.events.append(event)
        self.rows += n
        self._pending.put(("rows", slot))

    def _fill(self, buffers: SiteBuffers, activations: torch.Tensor, rows: torch.Tensor | None,
              keep_idx: torch.Tensor | None, n: int) -> None:
        """One site's kept rows into `buffers` (on the activations' device): rows, norms, fp8 encoding."""
        if buffers.scales is None and (rows is None or rows.dtype == self.dtype):  # straight into the buffer
            if rows is None:
                kept_rows(activations, keep_idx, out=buffers.rows[:n])
            else:
                buffers.rows[:n].copy_(rows)
            row_norms(buffers.rows[:n], out=buffers.norms[:n])
            return
        gathered = kept_rows(activations, keep_idx) if rows is None else rows  # [n, d_model] model dtype
        row_norms(gathered, out=buffers.norms[:n])
        if buffers.scales is None:
            buffers.rows[:n].copy_(gathered)
        else:
            fp8.encode(gathered, buffers.rows[:n], buffers.scales[:n], buffers.errors[:n])

    def close_shard(self, stream_state: dict) -> None:
        """Complete the current shards (if they hold rows); `stream_state` resumes right after them."""
        self._check()
        if self.rows == 0:
            return
        self._pending.put(("close", stream_state))
        self.rows = 0

    # ---- the writer thread ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            kind, payload = item
            try:
                if kind == "rows":
                    for event in payload.events:
                        event.synchronize()  # the device-to-host copies into the slot are done
                    for i in range(len(self.stores)):
                        self._write_rows(i, payload)
                    self._free.put(payload)
                else:
                    self._close(payload)
            except BaseException as error:  # reported to the main thread by _check
                self._error = error
                return

    def _write_rows(self, site: int, slot: Slot) -> None:
        folder, manifest = self.stores[site]
        if self._shards[site] is None:
            self._shards[site] = ShardFile(folder, manifest, self.shard_rows)
        shard, host, n = self._shards[site], slot.host[site], slot.rows
        columns = [host.rows[:n], slot.token_ids, slot.positions, host.norms[:n]]
        if host.scales is not None:
            columns += [host.scales[:n], host.errors[:n]]
        finite = torch.isfinite(host.norms[:n])  # [n]
        dropped = n - int(finite.sum())
        if dropped:
            bad = (~finite).nonzero().squeeze(1)[:5].tolist()
            tokens = [f"{self.describe_token(int(slot.token_ids[i]))!r} at position {int(slot.positions[i])}"
                      for i in bad]
            logger.warning("%s: left out %d row(s) of %d whose activations hold a NaN or Inf: %s%s",
                           self._name(site, shard), dropped, n, ", ".join(tokens),
                           ", ..." if dropped > len(bad) else "")
            self._dropped[site] += dropped
            self._dropped_tokens[site] = (self._dropped_tokens[site] + tokens)[:5]
            self.nonfinite_rows += dropped
            columns = [column[finite] for column in columns]
        shard.append(*columns)

    def _name(self, site: int, shard: ShardFile) -> str:
        name = shard.path.name
        return f"{os.path.basename(self.stores[site][0])}/{name}" if len(self.stores) > 1 else name

    def _close(self, stream_state: dict) -> None:
        for site, shard in enumerate(self._shards):
            if shard.rows == 0:
                examples, name = ", ".join(self._dropped_tokens[site]), self._name(site, shard)
                raise RuntimeError(f"every one of the {self._dropped[site]} rows of {name} "
                                   f"has a NaN or Inf activation (e.g. {examples}): the model's forward is "
                                   "broken at this layer; try --dtype float32 or another --target_layer")
        for shard in self._shards:  # every shard file in place, then every manifest
            self._closed_bytes += shard.finish()
        for site, shard in enumerate(self._shards):
            shard.list_in_manifest(stream_state, self._dropped[site])
            logger.debug("wrote %s: %d tokens", self._name(site, shard), shard.rows)
            self._crash_check(site)
        self._shards = [None] * len(self.stores)
        self._dropped = [0] * len(self.stores)
        self._dropped_tokens = [[] for _ in self.stores]

    def _crash_check(self, site: int) -> None:
        if self._crash_after is None:
            return
        after, at_site = (*self._crash_after, len(self.stores) - 1)[:2]
        if site == at_site and len(self.stores[site][1]["shards"]) >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- the end ----------------------------------------------------------------------------------

    def finish(self, stream_state: dict) -> None:
        """Close the last (partial) shards, wait for every write, and raise any writer error."""
        self.close_shard(stream_state)
        self._pending.put(None)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop after what is already queued (on an error in the main thread); drop the incomplete shards."""
        self._pending.put(None)
        self._thread.join()
        for shard in self._shards:
            if shard is not None:
                shard.discard()
