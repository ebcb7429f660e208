"""One writer per store: a second collector is refused naming the first, a killed one's lock is taken over."""

import logging
import re
import subprocess
import sys

import pytest
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from safetensors import safe_open

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.lock import StoreLock, active_writer
from saetron.collect.store import StoreError, read_manifest
from saetron.collect.writer import ShardWriter

HOLD = "import sys; from saetron.collect.lock import StoreLock; StoreLock(sys.argv[1]).acquire(); " \
       "print('locked', flush=True); sys.stdin.read()"


def test_second_collector_is_refused_while_the_first_runs(tiny_llama, docs_jsonl, tmp_path, monkeypatch):  # noqa: F811
    out = str(tmp_path / "s")
    first = dict(model=tiny_llama, target_layer=2, output_dir=out, dataset=docs_jsonl, context_size=24,
                 batch_size=2, max_tokens=200, shard_tokens=60)
    refusals = []
    close_shard = ShardWriter.close_shard

    def close_then_start_another(self, state):  # a second collector (another layer) starts mid-run
        close_shard(self, state)
        try:
            collect(CollectConfig(**{**first, "target_layer": 1}))
        except StoreError as e:
            refusals.append(str(e))

    monkeypatch.setattr(ShardWriter, "close_shard", close_then_start_another)
    manifest = collect(CollectConfig(**first))
    assert refusals and re.search(rf"{out} is being written by another collector \(pid \d+ on .*\); wait for "
                                  "it to finish or stop it, or write to another --output_dir", refusals[0])
    assert manifest == read_manifest(out) and len(manifest["shards"]) >= 3
    for entry in manifest["shards"]:  # every shard is the first collector's layer
        with safe_open(f"{out}/{entry['file']}", framework="pt") as f:
            assert f.metadata()["target_layer"] == "2"


def test_live_lock_refuses_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = rf"another collector \(pid {holder.pid} on .*, started .*: -c {tmp_path}\)"
        with pytest.raises(StoreError, match=message):
            StoreLock(tmp_path).acquire()
        assert str(holder.pid) in active_writer(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.INFO, logger="saetron.collect.lock"), StoreLock(tmp_path):
        assert active_writer(tmp_path) is not None  # held by this process now
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert active_writer(tmp_path) is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saetron.collect.lock"), StoreLock(tmp_path):
        pass
    assert "taking over" not in caplog.text  # released in order: nothing to take over
