"""The activation store's format: the manifest schema and its validation, the manifest's atomic rewrite, and
the check of a shard file against its manifest entry. `saetron.collect.store` re-exports every name here;
import them from there.

A store is a folder:

    manifest.json            MANIFEST_FIELDS below, rewritten atomically after each shard
    shard_00000.safetensors  activations [N, d_model] (the manifest's dtype), token_ids [N] int32,
                             positions [N] int32 (the token's position in its context window), and for
                             float8_e4m3fn stores scales [N] float32 (row r decodes as
                             activations[r] * scales[r], fp8.py); the header's metadata repeats the
                             manifest's SHARD_METADATA_KEYS
    .lock                    held by the collector writing the store (lock.py)

Each entry of `shards` is {"file", "tokens", "stream_state", "nonfinite_rows", "norms", "quantization"}:
`stream_state` resumes the text stream right after this shard (so a store cut back to its first i
shards resumes exactly, repair.py), `nonfinite_rows` counts the rows with a NaN/Inf the collector left
out, `norms` holds NORM_STATS of the L2 norms of the kept rows (float32, before any fp8 encoding),
`quantization` is null, or for float8_e4m3fn stores fp8.QUANTIZATION_STATS of the encoding error of the
shard's rows. Format version 2 (no float8, no `quantization`) is read as well; a resumed version-2 store
stays version 2.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .fp8 import QUANTIZATION_STATS

FORMAT = "saetron-activations"
# 2: per-shard stream_state, nonfinite_rows and norms; stream_ended. 3: float8_e4m3fn with per-row scales,
# per-shard quantization.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
SHARD_GLOB = "shard_*.safetensors"
HOOK_CONVENTIONS = {
    "resid_post": "output of model.layers[L] (the residual stream after block L)",
    "resid_pre": "input of model.layers[L] (the output of model.layers[L-1]; the embeddings for L = 0)",
    "mlp_out": "output of model.layers[L].mlp, before its residual add",
    "attn_out": "output of model.layers[L].self_attn (first item), before its residual add",
}
# safetensors dtype -> (manifest dtype, numpy dtype of the memmap, torch dtype of the stored values). bf16 and
# fp8 have no numpy dtype: they are mapped as int16 / uint8 and viewed as bfloat16 / float8, bit for bit.
DTYPES = {"F32": ("float32", np.float32, torch.float32), "F16": ("float16", np.float16, torch.float16),
          "BF16": ("bfloat16", np.int16, torch.bfloat16),
          "F8_E4M3": ("float8_e4m3fn", np.uint8, torch.float8_e4m3fn)}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "F8_E4M3": 1}
STORED_DTYPES = tuple(name for name, _, _ in DTYPES.values())
SCALED_DTYPE = "float8_e4m3fn"  # the stored dtype whose rows carry a scale
ROW_TENSORS = {"token_ids": "I32", "positions": "I32"}  # beside `activations`, one value per row
SCALES = ("scales", "F32")  # the extra row tensor of SCALED_DTYPE stores
# Manifest fields every shard's header repeats: a shard of another collection is caught before training.
SHARD_METADATA_KEYS = ("format", "format_version", "model", "target_layer", "hook_point", "dtype",
                       "context_size")
NORM_STATS = ("mean", "min", "median", "q90", "q99", "max")


class StoreError(ValueError):
    """A store (or a folder meant to be one) that cannot be used as it is; the message says what to do."""


# ---- the manifest schema -------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _stats(v, names) -> bool:
    return isinstance(v, dict) and all(_is_number(v.get(k)) for k in names)


# field -> (test, what it must be); in the order the collector writes them.
MANIFEST_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": (lambda v: v in READABLE_VERSIONS, f"one of {READABLE_VERSIONS}"),
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
    "norms": (lambda v: _stats(v, NORM_STATS), f"an object with numbers {list(NORM_STATS)}"),
}
# Version 3 adds it: null, or the encoding error of a float8_e4m3fn shard.
QUANTIZATION_FIELD = ("quantization", f"null, or for {SCALED_DTYPE} stores an object with numbers "
                                      f"{list(QUANTIZATION_STATS)}")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _damaged(where: str, field: str, expected: str, got) -> StoreError:
    return StoreError(f"{where}.{field} must be {expected}, got {got!r}; the store is damaged: restore the "
                      "manifest or collect the store again")


def validate_manifest(manifest: object, path: str | Path) -> dict:
    """Check `manifest` (parsed JSON) against MANIFEST_FIELDS and SHARD_FIELDS; returns it.

    Raises StoreError naming the first bad field, its value and what it must be."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{path} holds a JSON {type(manifest).__name__}, expected an object with the "
                         f"fields {list(MANIFEST_FIELDS)}: it is not a saetron store manifest; collect the "
                         "store again")
    got = (manifest.get("format"), manifest.get("format_version"))
    if got[0] != FORMAT or got[1] not in READABLE_VERSIONS:
        versions = " or ".join(map(str, READABLE_VERSIONS))
        raise StoreError(f"{path}: expected format {FORMAT!r} version {versions}, got {got[0]!r} version "
                         f"{got[1]!r}; collect the activations again with this saetron, into a new folder")
    for name, (ok, expected) in MANIFEST_FIELDS.items():
        if name not in manifest:
            raise StoreError(f"{path} lacks the field {name!r} ({expected}); the store is damaged: "
                             "restore the manifest or collect the store again")
        if not ok(manifest[name]):
            raise StoreError(f"{path}: field {name!r} must be {expected}, got {manifest[name]!r}; the store "
                             "is damaged: restore the manifest or collect the store again")
    scaled = manifest["dtype"] == SCALED_DTYPE
    if scaled and manifest["format_version"] < 3:
        unscaled = [name for name in STORED_DTYPES if name != SCALED_DTYPE]
        raise _damaged(str(path), "dtype", f"one of {unscaled} in version 2", manifest["dtype"])
    for i, entry in enumerate(manifest["shards"]):
        where = f"{path}: shards[{i}]"
        if not isinstance(entry, dict):
            raise StoreError(f"{where} must be an object {list(SHARD_FIELDS)}, got {entry!r}")
        for name, (ok, expected) in SHARD_FIELDS.items():
            if not ok(entry.get(name)):
                raise _damaged(where, name, expected, entry.get(name))
        if manifest["format_version"] >= 3:
            quantization = entry.get("quantization", "missing")
            ok = _stats(quantization, QUANTIZATION_STATS) if scaled else quantization is None
            if not ok:
                raise _damaged(where, *QUANTIZATION_FIELD, quantization)
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
    """A manifest with no shard yet, its fields in MANIFEST_FIELDS' order; `dtype` is the stored dtype."""
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


def write_atomically(path: str, write) -> None:
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

    write_atomically(path, write)


def norm_stats(norms: torch.Tensor) -> dict:
    """NORM_STATS of row norms [n] (finite, n >= 1): mean, min, median, q90, q99, max (lower quantiles)."""
    ordered = norms.double().sort().values  # [n]
    n = len(ordered)

    def quantile(q: float) -> float:
        return ordered[min(int(q * (n - 1)), n - 1)].item()

    return {"mean": ordered.mean().item(), "min": ordered[0].item(), "median": quantile(0.5),
            "q90": quantile(0.9), "q99": quantile(0.99), "max": ordered[-1].item()}


def row_norms(activations: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """L2 norm of each row of activations [n, d_model], accumulated in float32 -> [n] float32 (into `out`
    when given). A row with a NaN or Inf (or a norm past float32's 3.4e38) has a non-finite norm: such rows
    are never stored nor trained on."""
    return torch.linalg.vector_norm(activations, dim=1, dtype=torch.float32, out=out)


def shard_tensors(manifest: dict, rows: int) -> dict[str, tuple[list[int], str]]:
    """The tensors of a shard of `rows` rows, in file order: name -> (shape, safetensors dtype)."""
    stored = next(k for k, v in DTYPES.items() if v[0] == manifest["dtype"])
    tensors = {"activations": ([rows, manifest["d_model"]], stored),
               **{name: ([rows], dtype) for name, dtype in ROW_TENSORS.items()}}
    if manifest["dtype"] == SCALED_DTYPE:
        tensors[SCALES[0]] = ([rows], SCALES[1])
    return tensors


def shard_header(manifest: dict, rows: int) -> bytes:
    """The safetensors header JSON of a shard of `rows` rows (tensors contiguous in shard_tensors' order)."""
    header: dict = {"__metadata__": {key: str(manifest[key]) for key in SHARD_METADATA_KEYS}}
    offset = 0
    for name, (shape, dtype) in shard_tensors(manifest, rows).items():
        nbytes = int(np.prod(shape)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return json.dumps(header, separators=(",", ":")).encode()


# ---- checking shards -----------------------------------------------------------------------------

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
    expected = shard_tensors(manifest, entry["tokens"])
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
