"""Background tokenizer: documents -> context windows [B, T] with a BOS at each start, and the rows to keep.

Documents are tokenized without special tokens, each followed by EOS (where the tokenizer has one),
and concatenated; every window is BOS + the next `context_size - 1` tokens of that stream. A final
stretch shorter than a window is dropped.

The stream state after a window is `{"dataset": S, "doc_offset": o, "windows": w}`: load the
dataset state S (taken just before document k was read; None = the start), read document k, skip its
first o tokens, and the next window is the one that followed. Resuming from it repeats no token
and loses none.
"""

from __future__ import annotations

import copy
import itertools
import logging
import queue
import threading
from dataclasses import dataclass

import torch

from .data import pick_text_field

logger = logging.getLogger(__name__)

DOCS_PER_CALL = 64  # documents per tokenizer call: enough to keep Rust's threads busy, ~0.3 MB of text


@dataclass
class Batch:
    """One forward pass worth of windows, with the rows the store keeps (in row-major order)."""

    input_ids: torch.Tensor  # [B, T] int64
    keep_idx: torch.Tensor  # [n] int64, flat indices into B*T
    token_ids: torch.Tensor  # [n] int32
    positions: torch.Tensor  # [n] int32, position in the context window
    stream_state: dict  # resumes right after this batch's last window


def special_token_ids(tokenizer) -> list[int]:
    """BOS and every other special token id of `tokenizer` (sorted)."""
    ids = set(tokenizer.all_special_ids)
    if tokenizer.bos_token_id is not None:
        ids.add(tokenizer.bos_token_id)
    return sorted(ids)


def bos_token_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has neither a BOS nor an EOS token to start each context "
            "window with; use a model whose tokenizer defines bos_token"
        )
    return bos


def _documents(stream, text_field: str | None, info: dict | None, state_before_first: dict | None,
               skip: int = 0, every: int = 1):
    """Yields (text, dataset state just before it) for documents skip, skip + every, ... of `stream`."""
    state_before, field = state_before_first, None
    for i, example in enumerate(stream):
        if i >= skip and (i - skip) % every == 0:
            if field is None:
                field = pick_text_field(example, text_field)
                if info is not None:
                    info["text_field"] = field
            yield example[field], state_before
        state_before = copy.deepcopy(stream.state_dict())  # a live object: copy it


def _tokenized(documents, tokenizer, eos: int | None):
    """Yields (token ids, dataset state) per document, tokenizing up to DOCS_PER_CALL at a time: one
    call runs in Rust without the GIL (in parallel unless TOKENIZERS_PARALLELISM=false). Calls start at
    one document and double, so the first batch does not wait for 64 documents."""
    size = 1
    while group := list(itertools.islice(documents, size)):
        encoded = tokenizer([text for text, _ in group], add_special_tokens=False)["input_ids"]
        for tokens, (_, state) in zip(encoded, group):
            yield (tokens + [eos] if eos is not None else tokens), state
        size = min(2 * size, DOCS_PER_CALL)


def iter_windows(stream, tokenizer, context_size: int, text_field: str | None, start: dict | None,
                 info: dict | None = None, text_shard: tuple[int, int] = (0, 1)):
    """Yields (window [context_size] list of ids, stream state after it), resuming from `start`.

    The text field picked from the first document is put in `info["text_field"]`. `text_shard` (i, W): read
    only documents i, i + W, i + 2W, ... of the stream (W readers of one dataset, disjoint text); a state
    this yields always sits before one of them, so a resume needs nothing more.
    """
    bos, eos = bos_token_id(tokenizer), tokenizer.eos_token_id
    n = context_size - 1  # stream tokens per window, after its BOS
    skip, windows, first_state = 0, 0, copy.deepcopy(stream.state_dict())  # the stream's start
    if start is not None:
        if start["dataset"] is not None:
            stream.load_state_dict(start["dataset"])
            first_state = copy.deepcopy(start["dataset"])
        skip, windows = start["doc_offset"], start["windows"]
    index, count = text_shard
    skip_docs = index if start is None or start["dataset"] is None else 0  # at the stream's start: to doc i
    documents = _documents(stream, text_field, info, first_state, skip_docs, count)
    pending: list[int] = []  # fewer than n tokens carried over from earlier documents
    for tokens, state in _tokenized(documents, tokenizer, eos):
        stream_tokens, at = pending + tokens[skip:], 0
        skip = 0
        while len(stream_tokens) - at >= n:
            window, at = [bos] + stream_tokens[at:at + n], at + n
            windows += 1
            # what is left is a suffix of this document: its first `doc_offset` tokens are consumed
            yield window, {"dataset": state, "doc_offset": len(tokens) - (len(stream_tokens) - at),
                           "windows": windows}
        pending = stream_tokens[at:]


def kept_rows(activations: torch.Tensor, keep_idx: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The rows a store keeps of one batch: activations [B, T, d_model] -> rows keep_idx [n] of the B*T
    (make_batch's policy), [n, d_model], into `out` when given. keep_idx is on the activations' device."""
    return torch.index_select(activations.reshape(-1, activations.shape[-1]), 0, keep_idx, out=out)


def make_batch(windows: list[list[int]], special_ids: torch.Tensor, keep_special: bool, state: dict,
               pin: bool) -> Batch:
    input_ids = torch.tensor(windows, dtype=torch.int64)  # [B, T]
    positions = torch.arange(input_ids.shape[1], dtype=torch.int32).expand_as(input_ids)  # [B, T]
    if keep_special:
        keep = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        keep = ~torch.isin(input_ids, special_ids) & (positions > 0)  # [B, T]
    keep_idx = keep.flatten().nonzero().squeeze(1)  # [n]
    token_ids = input_ids.flatten()[keep_idx].to(torch.int32)
    kept_positions = positions.flatten()[keep_idx]
    if pin:  # page-locked so the host-to-device copies can be asynchronous
        input_ids, keep_idx = input_ids.pin_memory(), keep_idx.pin_memory()
    return Batch(input_ids, keep_idx, token_ids, kept_positions, state)


class BatchProducer:
    """A daemon thread that tokenizes and packs ahead of the forward passes (a bounded queue).

    Iterate it for `Batch`es; an error in the thread is raised in the iterating one.
    """

    def __init__(self, stream, tokenizer, context_size: int, batch_size: int, text_field: str | None,
                 keep_special: bool, start: dict | None, pin: bool = False, prefetch: int = 4,
                 text_shard: tuple[int, int] = (0, 1)):
        self.info: dict = {}  # text_field, once the first document is read
        self._args = (stream, tokenizer, context_size, text_field, start, self.info, text_shard)
        self._special = torch.tensor(special_token_ids(tokenizer), dtype=torch.int64)
        self._batch_size, self._keep_special, self._pin = batch_size, keep_special, pin
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saetron-tokenizer", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            windows: list[list[int]] = []
            state = None
            for window, state in iter_windows(*self._args):
                windows.append(window)
                if len(windows) == self._batch_size:
                    batch = make_batch(windows, self._special, self._keep_special, state, self._pin)
                    if not self._put(batch):
                        return
                    windows = []
            if windows:
                self._put(make_batch(windows, self._special, self._keep_special, state, self._pin))
            self._put(None)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(error)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
