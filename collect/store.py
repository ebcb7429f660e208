"""The activation store: its format, the checks of a manifest and of every shard, and the reader.

One module for every program that touches a store: the collector writes it (writer.py), the trainer
reads it (sae/data.py), an evaluation opens it with `ActivationStore(folder)` and reads rows in order
with `iter_rows` (activations, token_ids, positions) or by global row id with `gather`. A store is a
folder:

    manifest.json            MANIFEST_FIELDS below, rewritten atomically after each shard
    shard_00000.safetensors  activations [N, d_model] (the manifest's dtype), token_ids [N] int32,
                             positions [N] int32 (the token's position in its context window); the
                             header's metadata repeats the manifest's SHARD_METADATA_KEYS
    .lock                    held by the collector writing the store (lock.py)

Each entry of `shards` is {"file", "tokens", "stream_state", "nonfinite_rows", "norms"}:
`stream_state` resumes the text stream right after this shard (so a store cut back to its first i
shards resumes exactly, repair.py), `nonfinite_rows` counts the rows with a NaN/Inf the collector left
out, `norms` holds NORM_STATS of the L2 norms of the kept rows (float32). Readers validate the whole
manifest against its schema and every shard against the manifest before reading a row: an error names
the file, the field, what was expected and what to do.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

FORMAT = "saetron-activations"
FORMAT_VERSION = 2  # 2: per-shard stream_state, nonfinite_rows and norms; stream_ended
MANIFEST = "manifest.json"
SHARD_GLOB = "shard_*.safetensors"
HOOK_CONVENTIONS = {
    "resid_post": "output of model.layers[L] (the residual stream after block L)",
    "resid_pre": "input of model.layers[L] (the output of model.layers[L-1]; the embeddings for L = 0)",
    "mlp_out": "output of model.layers[L].mlp, before its residual add",
    "attn_out": "output of model.layers[L].self_attn (first item), before its residual add",
}
# safetensors dtype -> (manifest dtype, numpy dtype of the memmap, torch dtype of the rows). bf16 has no
# numpy dtype: it is mapped as int16 and viewed as bfloat16, bit for bit.
DTYPES = {"F32": ("float32", np.float32, torch.float32), "F16": ("float16", np.float16, torch.float16),
          "BF16": ("bfloat16", np.int16, torch.bfloat16)}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}
STORED_DTYPES = tuple(name for name, _, _ in DTYPES.values())
ROW_TENSORS = {"token_ids": "I32", "positions": "I32"}  # beside `activations`, one value per row
# Manifest fields every shard's header repeats: a shard of another collection is caught before training.
SHARD_METADATA_KEYS = ("format", "format_version", "model", "target_layer", "hook_point", "dtype",
                       "context_size")
NORM_STATS = ("mean", "min", "median", "q90", "q99", "max")


# ---- the manifest schema -------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# field -> (test, what it must be); in the order the collector writes them.
MANIFEST_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": (lambda v: v == FORMAT_VERSION, str(FORMAT_VERSION)),
    "model": (lambda v: isinstance(v, str), "a string (hub id or path)"),
    "revision": (lambda v: isinstance(v, str), "a string"),
    "target_layer": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "hook_point": (lambda v: v in HOOK_CONVENTIONS, f"one of {sorted(HOOK_CONVENTIONS)}"),
    "hook_convention": (lambda v: isinstance(v, str), "a string"),
    "d_model": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "dtype": (lambda v: v in STORED_DTYPES, f"one of {list(STORED_DTYPES)}"),
    "context_size": (lambda v: _is_int(v) and v >= 2, "an int >= 2"),
    "special_token_policy": (lambda v: isinstance(v, dict) and isinstance(v.get("keep_special_tokens"), bool),
                             'an object with a boolean "keep_special_tokens"'),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "split": (lambda v: isinstance(v, str), "a string"),
    "text_field": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "stream_state": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "stream_ended": (lambda v: isinstance(v, bool), "true or false"),
    "tokenizer": (lambda v: isinstance(v, str), "a string"),
    "shards": (lambda v: isinstance(v, list), "a list of shard entries"),
    "total_tokens": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
}
SHARD_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "file": (lambda v: isinstance(v, str), "a file name"),
    "tokens": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "stream_state": (lambda v: isinstance(v, dict), "an object"),
    "nonfinite_rows": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "norms": (lambda v: isinstance(v, dict) and all(_is_number(v.get(k)) for k in NORM_STATS),
              f"an object with numbers {list(NORM_STATS)}"),
}


class StoreError(ValueError):
    """A store (or a folder meant to be one) that cannot be used as it is; the message says what to do."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def validate_manifest(manifest: object, path: str | Path) -> dict:
    """Check `manifest` (parsed JSON) against MANIFEST_FIELDS and SHARD_FIELDS; returns it.

    Raises StoreError naming the first bad field, its value and what it must be."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{path} holds a JSON {type(manifest).__name__}, expected an object with the "
                         f"fields {list(MANIFEST_FIELDS)}: it is not a saetron store manifest; collect the "
                         "store again")
    got = (manifest.get("format"), manifest.get("format_version"))
    if got != (FORMAT, FORMAT_VERSION):
        raise StoreError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, got {got[0]!r} "
                         f"version {got[1]!r}; collect the activations again with this saetron, into a new "
                         "folder")
    for name, (ok, expected) in MANIFEST_FIELDS.items():
        if name not in manifest:
            raise StoreError(f"{path} lacks the field {name!r} ({expected}); the store is damaged: "
                             "restore the manifest or collect the store again")
        if not ok(manifest[name]):
            raise StoreError(f"{path}: field {name!r} must be {expected}, got {manifest[name]!r}; the store "
                             "is damaged: restore the manifest or collect the store again")
    for i, entry in enumerate(manifest["shards"]):
        where = f"{path}: shards[{i}]"
        if not isinstance(entry, dict):
            raise StoreError(f"{where} must be an object {list(SHARD_FIELDS)}, got {entry!r}")
        for name, (ok, expected) in SHARD_FIELDS.items():
            if not ok(entry.get(name)):
                raise StoreError(f"{where}.{name} must be {expected}, got {entry.get(name)!r}; the store is "
                                 "damaged: restore the manifest or collect the store again")
        if entry["file"] != shard_name(i):
            raise StoreError(f"{where}.file is {entry['file']!r}, expected {shard_name(i)!r} (shards are "
                             "numbered in order); the store is damaged: collect it again")
    listed = sum(entry["tokens"] for entry in manifest["shards"])
    if manifest["total_tokens"] != listed:
        raise StoreError(f"{path}: total_tokens is {manifest['total_tokens']} but the shards list {listed}; "
                         "the store is damaged: restore the manifest or collect the store again")
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """The validated manifest of the store in `folder`; StoreError when it is missing or invalid."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise StoreError(f"{str(folder)!r} is not a folder: expected an activation store (manifest.json + "
                         "shard_*.safetensors); run saetron-collect first or fix the path")
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:5]
        raise StoreError(f"no manifest.json in {str(folder)!r} (found {found or 'nothing'}): expected an "
                         "activation store written by saetron-collect; run it first or fix the path")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path} is not readable JSON ({e}); restore it or collect the store again") from e
    return validate_manifest(manifest, path)


def new_manifest(*, model: str, revision: str, target_layer: int, hook_point: str, d_model: int,
                 dtype: torch.dtype, context_size: int, keep_special_tokens: bool, dataset: str, split: str,
                 text_field: str | None, tokenizer: str) -> dict:
    """A manifest with no shard yet, its fields in MANIFEST_FIELDS' order."""
    excluded = "none" if keep_special_tokens else "bos, other special tokens, position 0"
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "revision": revision,
        "target_layer": target_layer, "hook_point": hook_point,
        "hook_convention": HOOK_CONVENTIONS[hook_point],
        "d_model": d_model, "dtype": dtype_name(dtype), "context_size": context_size,
        "special_token_policy": {"keep_special_tokens": keep_special_tokens, "excluded": excluded},
        "dataset": dataset, "split": split, "text_field": text_field, "stream_state": None,
        "stream_ended": False, "tokenizer": tokenizer, "shards": [], "total_tokens": 0,
    }


# ---- writing -------------------------------------------------------------------------------------

def _write_atomically(path: str, write) -> None:
    """`write(tmp_path)`, flush it to disk, then rename over `path`: a reader sees old or new, never half."""
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Validate `manifest` (a writer never leaves an invalid one) and replace manifest.json atomically."""
    path = os.path.join(folder, MANIFEST)
    validate_manifest(manifest, path)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)

    _write_atomically(path, write)


def norm_stats(norms: torch.Tensor) -> dict:
    """NORM_STATS of row norms [n] (finite, n >= 1): mean, min, median, q90, q99, max (lower quantiles)."""
    ordered = norms.double().sort().values  # [n]
    n = len(ordered)

    def quantile(q: float) -> float:
        return ordered[min(int(q * (n - 1)), n - 1)].item()

    return {"mean": ordered.mean().item(), "min": ordered[0].item(), "median": quantile(0.5),
            "q90": quantile(0.9), "q99": quantile(0.99), "max": ordered[-1].item()}


def row_norms(activations: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of activations [n, d_model], accumulated in float32 -> [n] float32. A row with
    a NaN or Inf (or a norm past float32's 3.4e38) has a non-finite norm."""
    return torch.linalg.vector_norm(activations, dim=1, dtype=torch.float32)


def write_shard(folder: str | Path, manifest: dict, activations: torch.Tensor, token_ids: torch.Tensor,
                positions: torch.Tensor, norms: torch.Tensor, stream_state: dict,
                nonfinite_rows: int = 0) -> int:
    """Write the next shard of `manifest`: activations [N, d_model] (N >= 1, finite), token_ids [N],
    positions [N], their row_norms [N]; append its entry and rewrite the manifest. Returns the shard's
    bytes. The shard is complete on disk before the manifest lists it."""
    index = len(manifest["shards"])
    path = os.path.join(folder, shard_name(index))
    metadata = {key: str(manifest[key]) for key in SHARD_METADATA_KEYS}
    tensors = {"activations": activations.contiguous(), "token_ids": token_ids.to(torch.int32).contiguous(),
               "positions": positions.to(torch.int32).contiguous()}

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # its I/O errors (a full disk, a folder gone) as the OSError they are
            raise OSError(f"cannot write shard {path}: {e}") from e
        os.chmod(tmp, 0o644)  # safetensors creates it 0600: the trainer may run as another user

    _write_atomically(path, write)
    manifest["shards"].append({"file": shard_name(index), "tokens": len(activations),
                               "stream_state": stream_state, "nonfinite_rows": nonfinite_rows,
                               "norms": norm_stats(norms)})
    manifest["total_tokens"] += len(activations)
    manifest["stream_state"] = stream_state
    write_manifest(folder, manifest)
    return os.path.getsize(path)


# ---- reading and checking shards -----------------------------------------------------------------

def read_shard_header(path: Path) -> tuple[int, dict]:
    """(header bytes incl. its 8-byte length, header JSON) of a safetensors file; StoreError if unreadable."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        raw = f.read(n) if n is not None and n < size else b""
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"shard {path} ({size} bytes) has no readable safetensors header: it is truncated "
                         "or not a shard") from None
    return 8 + n, header


def check_shard(folder: Path, manifest: dict, index: int) -> tuple[int, dict]:
    """Check shard `index` of `manifest` against it: present, complete, tensors of the listed shape and
    dtype, header metadata equal to the manifest's. Returns (data offset, header); StoreError if not."""
    entry = manifest["shards"][index]
    path = folder / entry["file"]
    if not path.is_file():
        raise StoreError(f"shard {path} listed in the manifest is missing")
    offset, header = read_shard_header(path)
    metadata = header.get("__metadata__") or {}
    for key in SHARD_METADATA_KEYS:
        if metadata.get(key) != str(manifest[key]):
            raise StoreError(f"shard {path} was written with {key} {metadata.get(key)!r} but {MANIFEST} says "
                             f"{manifest[key]!r}: the folder mixes two collections")
    n, d = entry["tokens"], manifest["d_model"]
    expected = {"activations": ([n, d], next(k for k, v in DTYPES.items() if v[0] == manifest["dtype"])),
                **{name: ([n], dtype) for name, dtype in ROW_TENSORS.items()}}
    for name, (shape, dtype) in expected.items():
        info = header.get(name)
        if not isinstance(info, dict) or (info.get("shape"), info.get("dtype")) != (shape, dtype):
            got = (info.get("shape"), info.get("dtype")) if isinstance(info, dict) else "nothing"
            raise StoreError(f"shard {path}: {name} is {got}, the manifest needs {shape} {dtype}")
        span = info.get("data_offsets")
        nbytes = int(np.prod(shape)) * ITEMSIZE[dtype]
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(v) for v in span)
                and span[1] - span[0] == nbytes):
            raise StoreError(f"shard {path}: {name} has data_offsets {span!r}, {shape} {dtype} needs "
                             f"{nbytes} bytes: the header is corrupt")
    size = path.stat().st_size
    needed = offset + max(header[name]["data_offsets"][1] for name in expected)
    if size != needed:
        state = "truncated" if size < needed else "damaged (longer than its header says)"
        raise StoreError(f"shard {path} is {state}: {size} bytes on disk, its header needs {needed}")
    return offset, header


def orphan_shards(folder: str | Path, manifest: dict) -> list[str]:
    """Shard files in `folder` that the manifest does not list (left by a crash or an earlier collection)."""
    listed = {entry["file"] for entry in manifest["shards"]}
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, SHARD_GLOB))
                  if os.path.basename(p) not in listed)


@dataclass
class Rows:
    """Consecutive rows of one shard: activations [n, d_model] (store dtype), token_ids [n] and
    positions [n] int32; `shard` is the shard's index, `start` the first row's index in it."""

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
        _, np_dtype, self.dtype = DTYPES[header["activations"]["dtype"]]
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

    def rows(self, start: int, stop: int, index: int = 0) -> Rows:
        """Rows [start, stop) as tensors (copies; bf16 viewed back from the int16 map)."""
        acts = torch.from_numpy(np.array(self.activations[start:stop]))
        return Rows(acts.view(self.dtype), torch.from_numpy(np.array(self.token_ids[start:stop])),
                    torch.from_numpy(np.array(self.positions[start:stop])), index, start)


class ActivationStore:
    """A store's first `num_shards` shards (all: None), each checked against the manifest, memory-mapped.

    `expect`: manifest fields the caller requires (e.g. {"target_layer": 15}); a mismatch is an error
    naming the flag `--field`. Global row r is row r - starts[s] of shard s, starts[s] <= r < starts[s+1].
    """

    def __init__(self, folder: str | Path, num_shards: int | None = None, expect: dict | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        for name, value in (expect or {}).items():
            if value is not None and value != m[name]:
                raise StoreError(f"--{name} {value} does not match the store's manifest {name} {m[name]} "
                                 f"({self.folder / MANIFEST}); fix --{name} or the store folder")
        if not m["shards"]:
            raise StoreError(f"{self.folder / MANIFEST} lists no shards: the collection wrote nothing yet; "
                             "let it write its first shard")
        if num_shards is not None and num_shards > len(m["shards"]):
            raise StoreError(f"--num_shards {num_shards} but the store has {len(m['shards'])} shards; pass "
                             f"at most {len(m['shards'])} (or omit it to read all)")
        self.d_model = m["d_model"]
        self.shards: list[Shard] = []
        for i in range(num_shards or len(m["shards"])):
            try:
                offset, header = check_shard(self.folder, m, i)
            except StoreError as e:
                raise StoreError(f"{e}; repair the store with `python -m saetron.collect --repair "
                                 f"{self.folder}` (it keeps the shards before this one), or read only the "
                                 f"first {i} shards (--num_shards {i})") from None
            self.shards.append(Shard(self.folder / m["shards"][i]["file"], m["shards"][i]["tokens"],
                                     self.d_model, offset, header))
        self.dtype = self.shards[0].dtype
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards])  # [num_shards + 1]
        self.total_tokens = int(self.starts[-1])

    def locate(self, row: int) -> tuple[Shard, int]:
        """Global row id -> (its shard, its index in that shard)."""
        s = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.shards[s], row - int(self.starts[s])

    def gather(self, rows: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Copy the activations of global rows [n] (int64) into out [n, d_model] (store dtype), in order."""
        out_np = out.view(torch.int16).numpy() if out.dtype == torch.bfloat16 else out.numpy()
        shard = np.searchsorted(self.starts, rows, side="right") - 1  # [n]
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = rows[where] - self.starts[s]
            order = np.argsort(local, kind="stable")  # ascending offsets: sequential page reads
            out_np[where[order]] = self.shards[s].activations[local[order]]
        return out

    def iter_rows(self, rows_per_read: int = 65536) -> Iterator[Rows]:
        """Every row in store order, at most `rows_per_read` rows at a time, never across shards."""
        for index, shard in enumerate(self.shards):
            for start in range(0, shard.tokens, rows_per_read):
                yield shard.rows(start, min(start + rows_per_read, shard.tokens), index)
