"""Repair: after a truncated shard (or an orphan file), --repair keeps the good prefix and the next run
resumes there; the store then equals an uninterrupted run, row for row."""

import json
import os
import subprocess
import sys

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from safetensors.torch import load_file

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.store import StoreError


def settings(model: str, dataset: str, out: str) -> dict:
    return dict(model=model, target_layer=2, output_dir=out, dataset=dataset, context_size=24, batch_size=2,
                max_tokens=300, shard_tokens=60)


def test_repair_after_a_truncated_shard_then_resume_equals_uninterrupted(tiny_llama, docs_jsonl,  # noqa: F811
                                                                         tmp_path):
    whole_dir, out = str(tmp_path / "whole"), str(tmp_path / "cut")
    whole = collect(CollectConfig(**settings(tiny_llama, docs_jsonl, whole_dir)))
    config = CollectConfig(**settings(tiny_llama, docs_jsonl, out))
    collect(config)
    assert len(whole["shards"]) >= 4
    shard = os.path.join(out, "shard_00001.safetensors")
    with open(shard, "r+b") as f:  # a disk error or a copy cut short
        f.truncate(os.path.getsize(shard) - 100)
    with open(os.path.join(out, "shard_00099.safetensors"), "wb") as f:  # an orphan of some earlier run
        f.write(b"not listed")
    with pytest.raises(StoreError, match=r"shard_00001.safetensors is truncated"):
        collect(config)

    repaired = subprocess.run([sys.executable, "-m", "saetron.collect", "--repair", out], capture_output=True,
                              text=True)
    assert repaired.returncode == 0, repaired.stderr
    assert "dropped it and the" in repaired.stderr and "run the collection command again" in repaired.stdout
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["shards"] == whole["shards"][:1]
    assert manifest["stream_state"] == whole["shards"][0]["stream_state"]
    assert sorted(os.listdir(out)) == [".lock", "manifest.json", "shard_00000.safetensors"]

    assert collect(config) == whole
    for entry in whole["shards"]:
        mine = load_file(os.path.join(out, entry["file"]))
        theirs = load_file(os.path.join(whole_dir, entry["file"]))
        for key in ("activations", "token_ids", "positions"):
            assert torch.equal(mine[key], theirs[key]), (entry["file"], key)


def test_repair_of_a_sound_store_changes_nothing(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    from saetron.collect.repair import repair_store

    config = {**settings(tiny_llama, docs_jsonl, str(tmp_path)), "max_tokens": 100}
    manifest = collect(CollectConfig(**config))
    assert repair_store(tmp_path) == manifest
