"""What an SAE was trained on, whether a store fits it, and whether its rows are held out.

The trainer's --output_dir holds `train_config.json` (data_dir, train_shards: the first shards it trained
on, the held-out slice following them; num_shards; target_layer, d_model) and
`saelens/cfg.json` (metadata.model_name = the store's model, metadata.hook_name =
`blocks.L.hook_POINT`); when the training store is still at data_dir, its manifest gives the rest
(dataset, split, context size, special-token policy, where its text ended: `stream_state`).

Held out. The collector is deterministic: two stores of the same model, tokenizer, dataset, split,
text field, context size and special-token policy hold the same row stream, each a prefix of it. The
SAE trained on the first `tokens` rows of that stream; evaluated rows from that many on are held out.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from saetron.collect.store import ActivationStore

from .store import open_store

logger = logging.getLogger(__name__)

STREAM_KEYS = ("model", "dataset", "split", "text_field", "context_size", "special_token_policy")
HOOK_NAME = re.compile(r"blocks\.(\d+)\.hook_(\w+)$")


@dataclass
class TrainedOn:
    """The SAE's training data, as far as its folder tells (None: not recorded)."""

    model: str | None = None
    target_layer: int | None = None
    hook_point: str | None = None
    data_dir: str | None = None
    manifest: dict | None = None
    """The training store's manifest, when still readable at data_dir."""
    tokens: int | None = None
    """Rows of the training store the SAE read (its first train_shards shards)."""

    def to_dict(self) -> dict:
        return {"model": self.model, "target_layer": self.target_layer, "hook_point": self.hook_point,
                "data_dir": self.data_dir, "tokens": self.tokens}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def trained_on(sae_dir: str | Path) -> TrainedOn:
    """Read train_config.json, saelens/cfg.json and, if present, the training store's manifest."""
    sae_dir = Path(sae_dir)
    out = TrainedOn()
    train = _read_json(sae_dir / "train_config.json") or {}
    metadata = (_read_json(sae_dir / "saelens" / "cfg.json") or {}).get("metadata", {})
    out.model = metadata.get("model_name")
    match = HOOK_NAME.match(metadata.get("hook_name") or "")
    if match:
        out.target_layer, out.hook_point = int(match.group(1)), match.group(2)
    if train.get("target_layer") is not None:
        out.target_layer = int(train["target_layer"])
    out.data_dir = train.get("data_dir")
    if out.data_dir:
        try:
            store = open_store(out.data_dir, 0, train.get("train_shards") or train.get("num_shards"))
        except ValueError as error:
            logger.info("the SAE's training store %s is not readable (%s): held-out status unknown",
                        out.data_dir, error)
            return out
        out.manifest, out.tokens = store.manifest, store.total_tokens
        out.model = out.model or store.manifest.get("model")
        out.hook_point = out.hook_point or store.manifest.get("hook_point")
    return out


def check_store(d_in: int, sae_dir: str, trained: TrainedOn, store: ActivationStore,
                allow_mismatch: bool) -> list[str]:
    """Raise ValueError if the store cannot be the SAE's input; returns the warnings (allow_mismatch)."""
    m = store.manifest
    if d_in != store.d_model:
        raise ValueError(f"the SAE {sae_dir} reads d_in={d_in} activations but the store {store.folder} "
                         f"holds d_model={store.d_model} (model {m.get('model')!r}, layer "
                         f"{m.get('target_layer')}): evaluate it on a store of its own model and layer")
    warnings = []
    for key, want in (("model", trained.model), ("target_layer", trained.target_layer),
                      ("hook_point", trained.hook_point)):
        got = m.get(key)
        if want is None or got is None or got == want:
            continue
        line = (f"the SAE {sae_dir} was trained on {key}={want!r} but the store {store.folder} holds "
                f"{key}={got!r}")
        if not allow_mismatch:
            raise ValueError(f"{line}: evaluate it on a store of its own {key}, or pass --allow_mismatch")
        logger.warning("%s (--allow_mismatch)", line)
        warnings.append(line)
    return warnings


def held_out(trained: TrainedOn, store: ActivationStore, rows: int) -> dict:
    """{"held_out": True/False/None, "why": a sentence} for the first `rows` rows of the chosen shards."""
    if trained.data_dir is None:
        return {"held_out": None, "why": "the SAE's folder names no training store (no train_config.json)"}
    if trained.manifest is None:
        return {"held_out": None, "why": f"the SAE's training store {trained.data_dir!r} is not readable"}
    m, t = store.manifest, trained.manifest
    first = sum(int(s["tokens"]) for s in m["shards"][: store.first_shard])  # the stream's row of our row 0
    same_store = os.path.realpath(store.folder) == os.path.realpath(trained.data_dir)
    if same_store or all(m.get(k) == t.get(k) for k in STREAM_KEYS):
        where = "the SAE's own store" if same_store else "a store of the SAE's text stream"
        if first >= trained.tokens:
            return {"held_out": True,
                    "why": f"{where}, rows {first}.. of it; the SAE trained on its first {trained.tokens}"}
        last = min(first + rows, trained.tokens) - 1
        return {"held_out": False,
                "why": f"{where}: rows {first}..{last} of it are training rows (the SAE trained on its first "
                       f"{trained.tokens}); choose later shards with --first_shard"}
    if (m.get("dataset"), m.get("split")) != (t.get("dataset"), t.get("split")):
        return {"held_out": True, "why": f"other text: {m.get('dataset')!r} ({m.get('split')}), the SAE "
                                         f"trained on {t.get('dataset')!r} ({t.get('split')})"}
    return {"held_out": None, "why": "the same dataset cut into other windows: rows may repeat training text"}
