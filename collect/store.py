"""The activation store: writing a shard while its rows arrive, and the reader every program shares.

One module for every program that touches a store: the collector writes it (writer.py through ShardFile),
the trainer reads it (sae/data.py), the evaluation (saetron.eval) opens a range of its shards with
`ActivationStore(folder, num_shards, first_shard=...)` and reads rows in order with `iter_rows`
(activations, token_ids, positions), a span of rows with `read`, a row's context window with `window_of`,
or rows by global row id with `gather`. The
format (manifest schema, shard layout, checks) is defined in store_format.py and re-exported here:
import every store name from this module.

float8_e4m3fn stores (fp8.py) hold each row as fp8 codes and a float32 scale; every reader here returns
decoded rows (float32 by default, `ActivationStore(..., decode_dtype=...)`), and `gather_encoded` hands the
codes and scales to a reader that decodes on its own device (the trainer decodes on the GPU).
"""

from __future__ import annotations

import glob
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from . import fp8
from .store_format import (  # noqa: F401 - re-exported: the store's names live in this module
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    HOOK_CONVENTIONS,
    ITEMSIZE,
    MANIFEST,
    MANIFEST_FIELDS,
    NORM_STATS,
    READABLE_VERSIONS,
    ROW_TENSORS,
    SCALED_DTYPE,
    SCALES,
    SHARD_FIELDS,
    SHARD_GLOB,
    SHARD_METADATA_KEYS,
    STORED_DTYPES,
    StoreError,
    check_shard,
    dtype_name,
    new_manifest,
    norm_stats,
    read_manifest,
    read_shard_header,
    row_norms,
    shard_header,
    shard_name,
    validate_manifest,
    write_atomically,
    write_manifest,
)

logger = logging.getLogger(__name__)

SYNC_BYTES = 64 << 20  # a shard being written is flushed to disk at least every 64 MiB (fdatasync)


# ---- writing -------------------------------------------------------------------------------------

class ShardFile:
    """The next shard of `manifest` in `folder`, written while its rows arrive (at most `capacity` rows).

    `append` writes activation rows to `shard_NNNNN.safetensors.tmp` after room left for the header (sized
    for `capacity` rows; the header is padded with spaces, which safetensors allows) and flushes them to
    disk every SYNC_BYTES; `close` appends the per-row tensors, writes the header, fsyncs, renames the file
    into place (`finish`) and then appends the shard's entry to the manifest (rewritten atomically,
    `list_in_manifest`): a multi-site run finishes every site's shard before it lists any. The disk works
    while the model runs, a close waits for the last rows only, and a crash leaves at worst the `.tmp`
    (removed by the next collection or a repair). The same rows and capacity give the same bytes.
    """

    def __init__(self, folder: str | Path, manifest: dict, capacity: int) -> None:
        self.manifest, self.capacity = manifest, capacity
        self.path = Path(folder) / shard_name(len(manifest["shards"]))
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.scaled = manifest["dtype"] == SCALED_DTYPE
        self.header_room = -(-len(shard_header(manifest, capacity)) // 8) * 8  # data 8-byte aligned
        self._itemsize = ITEMSIZE[next(k for k, v in DTYPES.items() if v[0] == manifest["dtype"])]
        self.rows = 0
        self._columns: dict[str, list[torch.Tensor]] = {"token_ids": [], "positions": [], "scales": [],
                                                        "norms": []}
        self._errors_sq = self._norms_sq = self._max_relative = 0.0
        self._unsynced = 0
        try:
            self._file = open(self.tmp, "wb")
            self._file.seek(8 + self.header_room)
        except OSError as e:
            raise OSError(f"cannot write shard {self.path}: {e}") from e

    def append(self, activations: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
               norms: torch.Tensor, scales: torch.Tensor | None = None,
               errors: torch.Tensor | None = None) -> None:
        """Rows in host memory: activations [n, d_model] in the stored dtype (fp8 codes for a float8 store,
        with their scales [n] and encoding errors ||x̂ - x|| [n]), token_ids, positions, row norms [n]."""
        n = len(activations)
        assert self.rows + n <= self.capacity, f"a shard of capacity {self.capacity} got {self.rows + n} rows"
        assert (scales is not None and errors is not None) == self.scaled, "float8 rows come with scales"
        if n == 0:
            return
        data = activations.contiguous().view(torch.uint8).numpy()  # [n, d_model * itemsize], no copy
        try:
            self._file.write(data)  # the GIL is released while the kernel copies it
            self._unsynced += data.nbytes
            if self._unsynced >= SYNC_BYTES:
                self._file.flush()
                os.fdatasync(self._file.fileno())
                self._unsynced = 0
        except OSError as e:
            raise OSError(f"cannot write shard {self.path}: {e}") from e
        self.rows += n
        for name, column in (("token_ids", token_ids), ("positions", positions), ("norms", norms)):
            self._columns[name].append(column.to(torch.int32 if name != "norms" else torch.float32).clone())
        if self.scaled:
            self._columns["scales"].append(scales.float().clone())
            norms_sq = norms.double().square()
            self._errors_sq += errors.double().square().sum().item()
            self._norms_sq += norms_sq.sum().item()
            relative = errors.double() / norms.double()
            relative = relative[norms > 0]
            if len(relative):
                self._max_relative = max(self._max_relative, relative.max().item())

    @property
    def bytes_appended(self) -> int:
        """Activation bytes written so far."""
        return self.rows * self.manifest["d_model"] * self._itemsize

    def finish(self) -> int:
        """Complete the shard file (>= 1 row) and rename it into place; returns its bytes. The manifest does
        not list it before `list_in_manifest`."""
        assert self.rows >= 1, "a shard holds at least one row"
        columns = [torch.cat(self._columns[name]) for name in ("token_ids", "positions")]
        if self.scaled:
            columns.append(torch.cat(self._columns["scales"]))
        header = shard_header(self.manifest, self.rows)
        try:
            for column in columns:
                self._file.write(column.numpy())
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self.header_room) + header.ljust(self.header_room, b" "))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self.tmp, 0o644)  # the trainer may run as another user
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise OSError(f"cannot write shard {self.path}: {e}") from e
        return os.path.getsize(self.path)

    def list_in_manifest(self, stream_state: dict, nonfinite_rows: int = 0) -> None:
        """Append the finished shard's entry (`stream_state` resumes right after it); rewrite the manifest."""
        entry = {"file": self.path.name, "tokens": self.rows, "stream_state": stream_state,
                 "nonfinite_rows": nonfinite_rows, "norms": norm_stats(torch.cat(self._columns["norms"]))}
        if self.manifest["format_version"] >= 3:
            entry["quantization"] = None if not self.scaled else \
                fp8.quantization_stats(self._errors_sq, self._norms_sq, self._max_relative)
        self.manifest["shards"].append(entry)
        self.manifest["total_tokens"] += self.rows
        self.manifest["stream_state"] = stream_state
        write_manifest(self.path.parent, self.manifest)

    def close(self, stream_state: dict, nonfinite_rows: int = 0) -> int:
        """finish, then list_in_manifest; returns the shard's bytes."""
        size = self.finish()
        self.list_in_manifest(stream_state, nonfinite_rows)
        return size

    def discard(self) -> None:
        """Drop the incomplete shard (an error elsewhere): close and remove the temporary file."""
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(folder: str | Path, manifest: dict, activations: torch.Tensor, token_ids: torch.Tensor,
                positions: torch.Tensor, norms: torch.Tensor, stream_state: dict,
                nonfinite_rows: int = 0) -> int:
    """Write the next shard of `manifest` in one call: activations [N, d_model] (N >= 1, finite; float rows
    are encoded here for a float8 store), token_ids [N], positions [N], their row_norms [N]; append its entry
    and rewrite the manifest. Returns the shard's bytes. The shard is complete on disk before the manifest
    lists it."""
    shard = ShardFile(folder, manifest, capacity=len(activations))
    activations = activations.cpu()
    if shard.scaled:
        n, d = activations.shape
        codes, scales, errors = torch.empty(n, d, dtype=fp8.FP8), torch.empty(n), torch.empty(n)
        fp8.encode(activations, codes, scales, errors)
        shard.append(codes, token_ids, positions, norms, scales, errors)
    else:
        shard.append(activations, token_ids, positions, norms)
    return shard.close(stream_state, nonfinite_rows)


def orphan_shards(folder: str | Path, manifest: dict) -> list[str]:
    """Shard files in `folder` that the manifest does not list (left by a crash or an earlier collection)."""
    listed = {entry["file"] for entry in manifest["shards"]}
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, SHARD_GLOB))
                  if os.path.basename(p) not in listed)


# ---- reading -------------------------------------------------------------------------------------

@dataclass
class Rows:
    """Consecutive rows: activations [n, d_model] (the store's dtype; float32 decoded rows for a float8
    store), token_ids [n] and positions [n] int32; `shard` is the first row's shard (its number in the
    store, from 0), `start` the first row's index in that shard."""

    activations: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    shard: int
    start: int


class Shard:
    """One checked shard, memory-mapped (rows are read only when indexed)."""

    def __init__(self, path: Path, tokens: int, d_model: int, offset: int, header: dict) -> None:
        self.path, self.tokens, self.d_model = path, tokens, d_model
        self._offset, self._header = offset, header
        _, np_dtype, self.dtype = DTYPES[header["activations"]["dtype"]]  # the stored dtype
        self.activations = self._map("activations", np_dtype, (tokens, d_model))  # [N, d_model]

    def _map(self, name: str, np_dtype, shape: tuple[int, ...]) -> np.memmap:
        return np.memmap(self.path, dtype=np_dtype, mode="r", shape=shape,
                         offset=self._offset + self._header[name]["data_offsets"][0])

    @cached_property
    def token_ids(self) -> np.memmap:  # [N] int32, mapped on first use (the trainer never reads it)
        return self._map("token_ids", np.int32, (self.tokens,))

    @cached_property
    def positions(self) -> np.memmap:  # [N] int32
        return self._map("positions", np.int32, (self.tokens,))

    @cached_property
    def scales(self) -> np.memmap:  # [N] float32, float8 shards only
        return self._map(SCALES[0], np.float32, (self.tokens,))

    def rows(self, start: int, stop: int, index: int = 0) -> Rows:
        """Rows [start, stop) as tensors (copies; bf16/fp8 viewed back from their integer maps, fp8 decoded
        to float32)."""
        acts = torch.from_numpy(np.array(self.activations[start:stop])).view(self.dtype)
        if self.dtype == fp8.FP8:
            acts = fp8.decode(acts, torch.from_numpy(np.array(self.scales[start:stop])))
        return Rows(acts, torch.from_numpy(np.array(self.token_ids[start:stop])),
                    torch.from_numpy(np.array(self.positions[start:stop])), index, start)


class ActivationStore:
    """Shards [first_shard, first_shard + num_shards) of a store (num_shards None: all from first_shard on),
    each checked against the manifest, memory-mapped.

    `expect`: manifest fields the caller requires (e.g. {"target_layer": 15}); a mismatch is an error
    naming the flag `--field`. Global row r (counted from the first chosen shard's first row) is row
    r - starts[s] of self.shards[s], starts[s] <= r < starts[s+1]. `dtype` is the dtype of the rows the
    reader returns: the stored one, or `decode_dtype` for a float8 store (`stored_dtype` is then
    float8_e4m3fn and `scaled` is True).
    """

    def __init__(self, folder: str | Path, num_shards: int | None = None, expect: dict | None = None,
                 decode_dtype: torch.dtype = torch.float32, first_shard: int = 0) -> None:
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        for name, value in (expect or {}).items():
            if value is not None and value != m[name]:
                raise StoreError(f"--{name} {value} does not match the store's manifest {name} {m[name]} "
                                 f"({self.folder / MANIFEST}); fix --{name} or the store folder")
        count = len(m["shards"])
        if not count:
            raise StoreError(f"{self.folder / MANIFEST} lists no shards: the collection wrote nothing yet; "
                             "let it write its first shard")
        if not 0 <= first_shard < count:
            raise StoreError(f"--first_shard {first_shard}: the store {str(self.folder)!r} has {count} "
                             f"shards; pick 0..{count - 1}")
        if num_shards is not None and not 1 <= num_shards <= count - first_shard:
            start = f" from --first_shard {first_shard}" if first_shard else ""
            raise StoreError(f"--num_shards {num_shards}{start} but the store has {count} shards; pass "
                             f"1..{count - first_shard} (or omit it to read all)")
        self.d_model = m["d_model"]
        self.first_shard = first_shard
        self.shards: list[Shard] = []
        for i in range(first_shard, count if num_shards is None else first_shard + num_shards):
            try:
                offset, header = check_shard(self.folder, m, i)
            except StoreError as e:
                other = f"read only the first {i} shards (--num_shards {i})" if i else "collect it again"
                raise StoreError(f"{e}; repair the store with `python -m saetron.collect --repair "
                                 f"{self.folder}` (it keeps the shards before this one), or "
                                 f"{other}") from None
            self.shards.append(Shard(self.folder / m["shards"][i]["file"], m["shards"][i]["tokens"],
                                     self.d_model, offset, header))
        self.stored_dtype = self.shards[0].dtype
        self.scaled = self.stored_dtype == fp8.FP8
        self.dtype = decode_dtype if self.scaled else self.stored_dtype
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards])  # [num_shards + 1]
        self.total_tokens = int(self.starts[-1])

    def locate(self, row: int) -> tuple[Shard, int]:
        """Global row id -> (its shard, its index in that shard)."""
        s = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.shards[s], row - int(self.starts[s])

    def _gather(self, rows: np.ndarray, out_np: np.ndarray, scales_np: np.ndarray | None) -> None:
        shard = np.searchsorted(self.starts, rows, side="right") - 1  # [n]
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = rows[where] - self.starts[s]
            order = np.argsort(local, kind="stable")  # ascending offsets: sequential page reads
            out_np[where[order]] = self.shards[s].activations[local[order]]
            if scales_np is not None:
                scales_np[where[order]] = self.shards[s].scales[local[order]]

    def gather(self, rows: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Copy the activations of global rows [n] (int64) into out [n, d_model] (`self.dtype`), in order;
        a float8 store's rows are decoded."""
        if self.scaled:
            codes = torch.empty(out.shape, dtype=torch.uint8)
            scales = torch.empty(len(rows), dtype=torch.float32)
            self.gather_encoded(rows, codes, scales)
            return out.copy_(fp8.decode(codes, scales, out.dtype))
        out_np = out.view(torch.int16).numpy() if out.dtype == torch.bfloat16 else out.numpy()
        self._gather(rows, out_np, None)
        return out

    def gather_encoded(self, rows: np.ndarray, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """A float8 store's global rows [n] as stored: codes [n, d_model] uint8 (the fp8 bytes) and scales [n]
        float32, for fp8.decode on another device."""
        assert self.scaled, "gather_encoded reads float8 stores"
        self._gather(rows, codes.numpy(), scales.numpy())

    @property
    def shard_files(self) -> list[str]:
        """The chosen shards' file names, in order."""
        return [shard.path.name for shard in self.shards]

    def iter_rows(self, rows_per_read: int = 65536, stop: int | None = None) -> Iterator[Rows]:
        """Rows [0, stop) in store order (stop None: every row), at most `rows_per_read` rows at a time,
        never across shards."""
        stop = self.total_tokens if stop is None else min(stop, self.total_tokens)
        for s, shard in enumerate(self.shards):
            end = min(shard.tokens, stop - int(self.starts[s]))
            for start in range(0, end, rows_per_read):
                yield shard.rows(start, min(start + rows_per_read, end), self.first_shard + s)

    def read(self, start: int, stop: int) -> Rows:
        """Global rows [start, stop) (0 <= start < stop <= total_tokens), which may span shards."""
        assert 0 <= start < stop <= self.total_tokens, f"rows [{start}, {stop}) of {self.total_tokens}"
        parts = []
        for s, shard in enumerate(self.shards):
            lo, hi = max(start, int(self.starts[s])), min(stop, int(self.starts[s + 1]))
            if lo < hi:
                first = int(self.starts[s])
                parts.append(shard.rows(lo - first, hi - first, self.first_shard + s))
        if len(parts) == 1:
            return parts[0]
        return Rows(*(torch.cat([getattr(p, name) for p in parts])
                      for name in ("activations", "token_ids", "positions")), parts[0].shard, parts[0].start)

    def window_of(self, row: int) -> tuple[int, int]:
        """The global rows [lo, hi) of the context window holding global `row`: the run of rows around it
        whose positions increase. The collector keeps a window's rows consecutively with strictly
        increasing positions, the next window starts at a position not above the last one's, and a
        window never spans two shards. Reads at most 2 * context_size positions (a window holds at most
        context_size rows)."""
        shard, local = self.locate(row)
        span = int(self.manifest.get("context_size") or 4096)
        first = max(0, local - span)
        positions = np.asarray(shard.positions[first:min(shard.tokens, local + span)])
        lo = hi = local - first
        hi += 1
        while lo > 0 and positions[lo - 1] < positions[lo]:
            lo -= 1
        while hi < len(positions) and positions[hi] > positions[hi - 1]:
            hi += 1
        base = row - local + first  # global id of positions[0]
        return base + lo, base + hi
