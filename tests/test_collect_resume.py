"""Resume and refusal: a collector killed after its first shard then re-run equals an uninterrupted run, row
for row; a store of another run, a truncated shard or an unwritable folder is a clear error losing nothing."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from safetensors.torch import load_file

from saetron.collect import collector
from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.writer import CRASH_ENV


def settings(model: str, dataset: str, out: str) -> dict:
    # Two windows of 24 per batch, shards of >= 60 rows: 2 batches a shard, several shards in all.
    return dict(model=model, target_layer=2, output_dir=out, dataset=dataset, context_size=24, batch_size=2,
                max_tokens=300, shard_tokens=60)


def cli(options: dict) -> list[str]:
    return [sys.executable, "-m", "saetron.collect"] + [f"--{k}={v}" for k, v in options.items()]


def snapshot(out: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(out))}


def test_killed_then_resumed_equals_uninterrupted(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    whole = collect(CollectConfig(**settings(tiny_llama, docs_jsonl, str(tmp_path / "whole"))))
    assert len(whole["shards"]) >= 3
    out = str(tmp_path / "resumed")
    command = cli(settings(tiny_llama, docs_jsonl, out))
    killed = subprocess.run(command, env={**os.environ, CRASH_ENV: "1"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL right after the first shard's manifest
    with open(os.path.join(out, "manifest.json")) as f:
        assert len(json.load(f)["shards"]) == 1
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["shards"] == whole["shards"] and manifest["stream_state"] == whole["stream_state"]
    for shard in whole["shards"]:
        mine = load_file(os.path.join(out, shard["file"]))
        theirs = load_file(os.path.join(str(tmp_path / "whole"), shard["file"]))
        for key in ("token_ids", "positions", "activations"):
            assert torch.equal(mine[key], theirs[key]), (shard["file"], key)
    assert "resuming" in resumed.stderr and "activation store:" in resumed.stdout
    assert "taking over the lock of pid" in resumed.stderr  # the killed run's lock did not block


def test_resume_of_a_complete_store_does_nothing(tiny_llama, docs_jsonl, tmp_path, monkeypatch):  # noqa: F811
    config = CollectConfig(**settings(tiny_llama, docs_jsonl, str(tmp_path / "s")))
    collect(config)
    before = snapshot(config.output_dir)

    def no_load(*args, **kwargs):
        raise AssertionError("a complete store must not load the model")

    monkeypatch.setattr(collector, "load_model", no_load)
    collect(config)
    assert snapshot(config.output_dir) == before
    with pytest.raises(ValueError, match="holds target_layer=2 but this run has target_layer=1"):
        collect(CollectConfig(**{**settings(tiny_llama, docs_jsonl, config.output_dir), "target_layer": 1}))


@pytest.mark.parametrize("change, message", [
    ({"target_layer": 1}, "holds target_layer=2 but this run has target_layer=1"),
    ({"hook_point": "resid_pre"}, "holds hook_point='resid_post' but this run has hook_point='resid_pre'"),
    ({"context_size": 16}, "holds context_size=24 but this run has context_size=16"),
    ({"dtype": "bfloat16"}, "holds dtype='float32' but this run has dtype='bfloat16'"),
    ({"model": "OTHER"}, "holds model='.*' but this run has model='.*other_model'"),
])
def test_store_of_another_run_is_refused(change, message, tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    first = settings(tiny_llama, docs_jsonl, str(tmp_path / "s"))
    collect(CollectConfig(**{**first, "max_tokens": 50}))
    before = snapshot(first["output_dir"])
    if change.get("model") == "OTHER":  # the same weights under another folder name
        os.symlink(tiny_llama, tmp_path / "other_model")
        change = {"model": str(tmp_path / "other_model")}
    with pytest.raises(ValueError, match=message):
        collect(CollectConfig(**{**first, **change}))
    assert snapshot(first["output_dir"]) == before


def test_truncated_shard_is_an_error(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    config = CollectConfig(**settings(tiny_llama, docs_jsonl, str(tmp_path / "s")))
    collect(CollectConfig(**{**settings(tiny_llama, docs_jsonl, config.output_dir), "max_tokens": 100}))
    shard = os.path.join(config.output_dir, "shard_00000.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    before = snapshot(config.output_dir)
    with pytest.raises(ValueError, match=r"shard_00000.safetensors is truncated: \d+ bytes on disk.*Nothing "
                       r"was deleted: `python -m saetron.collect --repair .*` drops it"):
        collect(config)
    assert snapshot(config.output_dir) == before


def test_unwritable_output_dir(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "store"):
        with pytest.raises(ValueError, match=r"--output_dir .*a_file.* is not a writable folder"):
            collect(CollectConfig(**settings(tiny_llama, docs_jsonl, str(out))))
    assert blocker.read_text() == "not a folder"


def test_leftover_temporaries_are_removed(tiny_llama, docs_jsonl, tmp_path):  # noqa: F811
    config = CollectConfig(**{**settings(tiny_llama, docs_jsonl, str(tmp_path / "s")), "max_tokens": 50})
    os.makedirs(config.output_dir)
    (tmp_path / "s" / "shard_00000.safetensors.tmp").write_bytes(b"half a shard")
    manifest = collect(config)
    assert sorted(os.listdir(config.output_dir)) == [".lock", "manifest.json", "shard_00000.safetensors"]
    assert manifest["total_tokens"] >= 50
