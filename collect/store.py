"""The activation store on disk (DESIGN.md): the manifest, shard files, and the checks before a resume."""

from __future__ import annotations

import glob
import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

FORMAT = "saetron-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HOOK_CONVENTIONS = {
    "resid_post": "output of model.layers[L] (the residual stream after block L)",
    "resid_pre": "input of model.layers[L] (the output of model.layers[L-1]; the embeddings for L = 0)",
    "mlp_out": "output of model.layers[L].mlp, before its residual add",
    "attn_out": "output of model.layers[L].self_attn (first item), before its residual add",
}
# A resumed run must agree with the store on these (the stream state is only valid for the same text).
RESUME_KEYS = ("model", "revision", "target_layer", "hook_point", "d_model", "dtype", "context_size",
               "special_token_policy", "dataset", "split", "tokenizer")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def special_token_policy(keep_special_tokens: bool) -> dict:
    excluded = "none" if keep_special_tokens else "bos, other special tokens, position 0"
    return {"keep_special_tokens": keep_special_tokens, "excluded": excluded}


def new_manifest(*, model: str, revision: str, target_layer: int, hook_point: str, d_model: int,
                 dtype: torch.dtype, context_size: int, keep_special_tokens: bool, dataset: str, split: str,
                 text_field: str | None, tokenizer: str) -> dict:
    """A manifest with no shard yet, keys in DESIGN.md's order."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "revision": revision,
        "target_layer": target_layer,
        "hook_point": hook_point,
        "hook_convention": HOOK_CONVENTIONS[hook_point],
        "d_model": d_model,
        "dtype": dtype_name(dtype),
        "context_size": context_size,
        "special_token_policy": special_token_policy(keep_special_tokens),
        "dataset": dataset,
        "split": split,
        "text_field": text_field,
        "stream_state": None,
        "tokenizer": tokenizer,
        "shards": [],
        "total_tokens": 0,
    }


def _write_atomically(path: str, write) -> None:
    """`write(tmp_path)`, flush it to disk, then rename over `path`: a reader sees old or new, never half."""
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(output_dir: str, manifest: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)

    _write_atomically(os.path.join(output_dir, MANIFEST), write)


def write_shard(path: str, activations: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
                manifest: dict) -> int:
    """Write one shard (`activations [N, d_model]`, `token_ids [N]`, `positions [N]`); returns its bytes."""
    metadata = {key: str(manifest[key]) for key in ("format", "format_version", "model", "target_layer",
                                                     "hook_point", "dtype", "context_size")}
    tensors = {"activations": activations, "token_ids": token_ids, "positions": positions}

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates it 0600: the trainer may run as another user

    _write_atomically(path, write)
    return os.path.getsize(path)


def read_manifest(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); restore it or use a new --output_dir") \
            from error
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this collector writes {FORMAT!r} version {FORMAT_VERSION}: use a new --output_dir"
        )
    return manifest


def check_resumable(output_dir: str, stored: dict, wanted: dict) -> None:
    """Refuse to extend a store of another run, or one whose shards are missing or truncated."""
    for key in RESUME_KEYS:
        if stored.get(key) != wanted[key]:
            raise ValueError(
                f"{output_dir} holds {key}={stored.get(key)!r} but this run has {key}={wanted[key]!r}: "
                "run with the store's settings to resume it, or pick a new --output_dir"
            )
    if wanted["text_field"] is not None and stored.get("text_field") != wanted["text_field"]:
        raise ValueError(
            f"{output_dir} holds text_field={stored.get('text_field')!r} but this run has "
            f"text_field={wanted['text_field']!r}: resume with the same --text_field or use a new "
            "--output_dir"
        )
    for shard in stored["shards"]:
        path = os.path.join(output_dir, shard["file"])
        try:
            with safe_open(path, framework="pt") as f:
                shape = f.get_slice("activations").get_shape()
        except Exception as error:  # missing, truncated, not safetensors: all the same to the user
            raise ValueError(
                f"{path} is missing or corrupt ({error}) although {MANIFEST} lists it with {shard['tokens']} "
                f"tokens. Nothing was deleted: remove it, the shards after it and their {MANIFEST} entries "
                "(and the stream_state) to recollect them, or use a new --output_dir"
            ) from error
        if list(shape) != [shard["tokens"], stored["d_model"]]:
            raise ValueError(
                f"{path} holds activations {list(shape)} but {MANIFEST} lists "
                f"[{shard['tokens']}, {stored['d_model']}]: the store is inconsistent; use a new --output_dir"
            )


def prepare_output_dir(output_dir: str) -> None:
    """Create `output_dir`, prove it writable, and drop temporaries a crash left (never complete)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--output_dir {output_dir} is not a writable folder ({error}); pick another") \
            from error
    for tmp in glob.glob(os.path.join(output_dir, "*.tmp")):
        logger.warning("removing %s, an incomplete file from an interrupted run", tmp)
        os.remove(tmp)
