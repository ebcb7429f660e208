"""The buffered training stream: rows from a resumable row stream (the model's forwards, or a store read in
order) cut into buffers of `buffer_rows` consecutive rows, each permuted, batches taken from them in order.

Order. Buffer i holds stream rows [i*N, (i+1)*N) (the last one fewer when the stream ends); its rows are
permuted by numpy's default_rng([seed, stream_index, i]). The training stream is the concatenation of the
permuted buffers; batch j is training-stream rows [j*batch_rows + offset, j*batch_rows + offset + local).
Live training gives each rank its own stream (stream_index = rank, offset 0, local = batch_rows = B / W);
a store read in this order is one stream every rank slices (stream_index 0, batch_rows = B, offset
r * B / W). The batches depend on the seed, the buffer size and the stream only: never on timing.

Overlap. A producer thread fills buffer i+1 (running the model's forwards on its own CUDA stream) while
the trainer draws batches from buffer i: two buffers, on the device or in pinned host memory. Events order
the two streams: a filled buffer is used only after its producer's work, and refilled only after the last
batch drawn from it. No host synchronization except on the pinned-host path (once per buffer).

Resume. A row stream yields chunks of rows with the position they start at (a JSON object its opener
takes back); buffer i's start is (the position of the chunk holding row i*N, rows of it to skip). `state(s)`
names the buffer holding the first row this rank reads at step s and its start, which a checkpoint keeps:
the buffer is refilled from there (the stream is deterministic), so a resumed run draws the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

# (rows [n, d_model] on any device, the position the chunk starts at): what a row stream yields.
Chunk = tuple[torch.Tensor, dict]
OpenRows = Callable[[dict | None], Iterator[Chunk]]  # position (None: the start) -> chunks from there
END = "end"


def buffer_permutation(seed: int, stream_index: int, buffer: int, rows: int) -> np.ndarray:
    """The permutation of buffer `buffer` (of `rows` rows) of stream `stream_index`: [rows] int64."""
    return np.random.default_rng([seed, stream_index, buffer]).permutation(rows)


@dataclass
class Buffer:
    rows: torch.Tensor  # [N, d_model]
    index: int = -1  # which buffer of the stream it holds
    filled: int = 0
    perm: torch.Tensor | None = None  # [filled] int64, on rows' device
    ready: torch.cuda.Event | None = None  # recorded by the producer after filling
    released: torch.cuda.Event | None = None  # recorded by the consumer after its last read


class BufferedBatches:
    """This rank's batches [start_step, stop_step) of the buffered training stream of `open_rows` (module
    docstring). Iterating yields x [local, d_model] on `device`; `peek(n)` gives the first n rows of the
    training stream (a fresh start only: the statistics pass); `state(step)` what a checkpoint needs
    to resume at `step`; `describe(step, rows)` names rows of a batch in an error.

    `resume`: a `state()` of an earlier run (None: from the stream's start). `buffer_device`: where the two
    buffers live (the training device, or the CPU: pinned when the device is CUDA).
    """

    def __init__(self, open_rows: OpenRows, d_model: int, dtype: torch.dtype, buffer_rows: int, seed: int,
                 stream_index: int, batch_rows: int, offset: int, local: int, start_step: int, stop_step: int,
                 device: torch.device, buffer_device: torch.device, resume: dict | None = None,
                 describe_stream: str = "the stream"):
        self.buffer_rows, self.seed, self.stream_index = buffer_rows, seed, stream_index
        self.batch_rows, self.offset, self.local = batch_rows, offset, local
        self.steps = range(start_step, stop_step)
        self.device, self.buffer_device, self.describe_stream = device, buffer_device, describe_stream
        first = self._first_row(start_step) // buffer_rows
        if resume is None:
            if first != 0:
                raise ValueError(f"step {start_step} reads buffer {first} of {describe_stream}: resuming "
                                 "there needs the stream position of a checkpoint (rank_*.json): none given")
            position = {"chunk": None, "skip": 0}
        else:
            if resume["buffer"] != first:
                raise ValueError(f"the checkpoint's stream position is at buffer {resume['buffer']} but step "
                                 f"{start_step} reads buffer {first}: the checkpoint belongs to another run")
            position = resume["position"]
        self.positions: dict[int, dict] = {first: position}  # buffer -> its start; written by the producer
        self.cuda = device.type == "cuda"
        pin = self.cuda and buffer_device.type == "cpu"
        self._free: queue.Queue = queue.Queue()
        for _ in range(2):  # one drawn from, one filling
            self._free.put(Buffer(torch.empty(buffer_rows, d_model, dtype=dtype, device=buffer_device,
                                              pin_memory=pin)))
        self._ready: queue.Queue = queue.Queue()
        self._held: dict[int, Buffer] = {}
        self._ended = False  # the producer reached the stream's end
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._thread = threading.Thread(target=self._produce, args=(open_rows, first, position),
                                        name="saetron-live-buffer", daemon=True)
        self._thread.start()

    def _first_row(self, step: int) -> int:
        return step * self.batch_rows + self.offset

    # ---- the producer thread ----------------------------------------------------------------------

    def _take(self, q: queue.Queue):
        while not self._stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _produce(self, open_rows: OpenRows, index: int, position: dict) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)  # a new thread starts on device 0; this rank's is another
            context = torch.cuda.stream(self._stream) if self.cuda else contextlib.nullcontext()
            with context:
                self._fill_all(open_rows, index, position)
        except BaseException as error:  # raised by the consumer when it reaches it
            self._ready.put(error)

    def _fill_all(self, open_rows: OpenRows, index: int, position: dict) -> None:
        chunks = open_rows(position["chunk"])
        try:
            self._fill_from(chunks, index, position)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator's cleanup: the row stream's own threads stop

    def _fill_from(self, chunks: Iterator[Chunk], index: int, position: dict) -> None:
        at, consumed, first = position["chunk"], position["skip"], True  # the chunk read, its rows used
        pending: torch.Tensor | None = None  # the rows of that chunk not used yet
        while True:
            buffer = self._take(self._free)
            if buffer is None:
                return
            if buffer.released is not None and self.cuda:
                self._stream.wait_event(buffer.released)  # the trainer's last read of it is done
            buffer.index, buffer.filled = index, 0
            while buffer.filled < self.buffer_rows:
                if pending is None or len(pending) == 0:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    rows, at = chunk
                    consumed = consumed if first else 0  # a resumed first chunk starts `skip` rows in
                    first, pending = False, rows[consumed:]
                    continue
                take = min(self.buffer_rows - buffer.filled, len(pending))
                buffer.rows[buffer.filled:buffer.filled + take].copy_(pending[:take], non_blocking=True)
                buffer.filled, consumed, pending = buffer.filled + take, consumed + take, pending[take:]
            self.positions[index + 1] = {"chunk": at, "skip": consumed}  # where buffer index + 1 starts
            if buffer.filled == 0:
                self._ready.put(END)
                return
            perm = buffer_permutation(self.seed, self.stream_index, index, buffer.filled)
            buffer.perm = torch.from_numpy(perm).to(self.buffer_device)
            if self.cuda:
                buffer.ready = torch.cuda.Event()
                buffer.ready.record(self._stream)
            self._ready.put(buffer)
            if buffer.filled < self.buffer_rows:
                self._ready.put(END)
                return
            index += 1

    # ---- the consumer (the training loop) ---------------------------------------------------------

    def _buffer(self, index: int) -> Buffer | None:
        """Buffer `index` (pulled from the producer in order), or None past the stream's end."""
        while index not in self._held:
            if self._ended:
                return None
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            if item == END:
                self._ended = True
                continue
            if item.ready is not None:
                if item.rows.is_cuda:
                    torch.cuda.current_stream(self.device).wait_event(item.ready)
                else:
                    item.ready.synchronize()  # the device-to-host copies into the pinned buffer
            self._held[item.index] = item
        return self._held[index]

    def _release_before(self, index: int) -> None:
        for i in [i for i in self._held if i < index]:
            buffer = self._held.pop(i)
            if self.cuda:
                buffer.released = torch.cuda.Event()
                buffer.released.record(torch.cuda.current_stream(self.device))
            self._free.put(buffer)

    def _rows(self, lo: int, hi: int, step: int | None) -> torch.Tensor:
        """Training-stream rows [lo, hi) on the device."""
        parts = []
        while lo < hi:
            index, at = divmod(lo, self.buffer_rows)
            buffer = self._buffer(index)
            if buffer is None or at >= buffer.filled:
                rows = index * self.buffer_rows + (buffer.filled if buffer else 0)
                where = f"at step {step}" if step is not None else "before step 0"
                raise ValueError(f"{self.describe_stream} ended after {rows} rows {where}: lower "
                                 "--max_steps, or give more text")
            stop = min(hi - index * self.buffer_rows, buffer.filled)
            parts.append(buffer.rows.index_select(0, buffer.perm[at:stop]))
            lo = index * self.buffer_rows + stop
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x.to(self.device, non_blocking=True) if x.device != self.device else x

    def peek(self, n: int) -> torch.Tensor:
        """The first n rows of the training stream [n, d_model] (n <= buffer_rows), on the device."""
        assert n <= self.buffer_rows and 0 in self.positions, "peek reads the first buffer of a fresh start"
        return self._rows(0, n, None)

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            for step in self.steps:
                lo = self._first_row(step)
                self._release_before(lo // self.buffer_rows)
                yield self._rows(lo, lo + self.local, step)
        finally:
            self.close()

    def state(self, step: int) -> dict:
        """What resumes this rank at `step`: the buffer holding its first row then, and where it starts."""
        index = self._first_row(step) // self.buffer_rows
        return {"buffer": index, "position": self.positions[index]}

    def describe(self, step: int, rows: np.ndarray) -> str:
        lo = self._first_row(step)
        named = ", ".join(str(lo + int(r)) for r in rows[:3])
        return (f"training-stream rows {named}{f' and {len(rows) - 3} more' if len(rows) > 3 else ''} of "
                f"{self.describe_stream} (step {step})")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
