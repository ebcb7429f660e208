"""Before step 0 the trainer checks the manifest against its schema and every shard against the manifest;
a non-finite row is an error naming its shard, row and step, or is dropped and counted (--skip_nonfinite)."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from train_support import plant, read_metrics, train_in_process, write_store

from saetron.collect.store import ActivationStore, StoreError
from saetron.sae import SparseAutoencoder
from saetron.sae.checkpoint import complete_checkpoints
from saetron.sae.data import ShuffleOrder

# 8 steps of 128 tokens per epoch over 600 + 500 rows; the statistics pass reads the first stats_tokens rows.
FLAGS = ["--d_sae", "64", "--batch_size", "128", "--log_every", "2", "--shuffle_buffer", "2048",
         "--normalize_activations", "none"]


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "store", [600, 500], d_model=16)


def rewrite_manifest(store, change) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps(change(manifest)))


@pytest.mark.parametrize("change, message", [
    (lambda m: [1, 2, 3], r"holds a JSON list, expected an object with the fields \['format', "),
    (lambda m: {**m, "d_model": "abc"}, r"field 'd_model' must be an int >= 1, got 'abc'"),
    (lambda m: {**m, "target_layer": None}, r"field 'target_layer' must be an int >= 0, got None"),
    (lambda m: {k: v for k, v in m.items() if k != "dtype"}, r"lacks the field 'dtype'"),
    (lambda m: {**m, "shards": [m["shards"][0], {**m["shards"][1], "tokens": "x"}]},
     r"shards\[1\].tokens must be an int >= 1, got 'x'"),
    (lambda m: {**m, "shards": [m["shards"][1], m["shards"][0]]}, r"shards\[0\].file is 'shard_00001"),
    (lambda m: {**m, "total_tokens": 7}, r"total_tokens is 7 but the shards list 1100"),
])
def test_garbage_manifests_name_the_field(store, tmp_path, change, message):
    rewrite_manifest(store, change)
    with pytest.raises(StoreError, match=r"manifest.json.*" + message):
        train_in_process(store, tmp_path / "out", *FLAGS)
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest.json is not readable JSON"):
        ActivationStore(store)


def test_a_shard_of_another_collection_is_refused(store, tmp_path):
    # Two collectors into one folder: the manifest says layer 3, shard 1 was written for layer 5.
    other = write_store(tmp_path / "other", [600, 500], d_model=16, target_layer=5)
    shutil.copy(other / "shard_00001.safetensors", store / "shard_00001.safetensors")
    with pytest.raises(StoreError, match=r"shard_00001.safetensors was written with target_layer '5' but "
                                         r"manifest.json says 3: the folder mixes two collections; repair"):
        train_in_process(store, tmp_path / "out", *FLAGS)
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before step 0
    last = train_in_process(store, tmp_path / "out", *FLAGS, "--num_shards", "1", "--max_steps", "2")
    assert last["step"] == 2


def step_of(store_dir, row: int, batch: int = 128, seed: int = 0) -> int:
    """The first step whose batch holds global row `row` (the trainer's order, epoch 0)."""
    store = ActivationStore(store_dir)
    order = ShuffleOrder(store.starts, 2048, seed).rows(0, 0, store.total_tokens)
    return int(np.nonzero(order == row)[0][0]) // batch


def test_a_nan_row_is_located_then_skipped_on_resume(store, tmp_path, caplog):
    plant(store / "shard_00001.safetensors", row=17, column=3, value=float("nan"))
    step = step_of(store, 600 + 17)
    assert 2 <= step < 8  # the batch layout puts it after the first checkpoint
    out = tmp_path / "out"
    # The statistics pass reads the stream's first 256 rows (steps 0-1 at 128 rows a step): not this row.
    flags = [*FLAGS, "--checkpoint_every", "2", "--stats_tokens", "256"]
    message = rf"shard_00001.safetensors row 17 \(step {step}\): 1 of 128 rows hold a NaN or Inf activation"
    with pytest.raises(ValueError, match=message + "; pass --skip_nonfinite"):
        train_in_process(store, out, *flags)
    assert complete_checkpoints(out / "checkpoints")[-1].name == f"step_{step // 2 * 2:08d}"

    with caplog.at_level(logging.WARNING):
        last = train_in_process(store, out, *flags, "--resume", "--skip_nonfinite")
    assert last["step"] == 8 and np.isfinite(last["loss"])
    assert f"dropped 1 of 128 rows holding a NaN or Inf (--skip_nonfinite): shard_00001.safetensors row 17 " \
           f"(step {step})" in caplog.text
    assert torch.isfinite(SparseAutoencoder.load(out).W_dec).all()
    assert [m["step"] for m in read_metrics(out)] == [2, 4, 6, 8]


def test_a_nan_row_in_the_statistics_pass(store, tmp_path):
    plant(store / "shard_00000.safetensors", row=5, column=0, value=float("inf"))
    flags = [f for f in FLAGS if f not in ("--normalize_activations", "none")]
    with pytest.raises(ValueError, match=r"shard_00000.safetensors row 5 \(the statistics pass before "
                                         r"step 0\)"):
        train_in_process(store, tmp_path / "a", *flags, "--max_steps", "2")
    last = train_in_process(store, tmp_path / "b", *flags, "--max_steps", "2", "--skip_nonfinite")
    assert torch.isfinite(SparseAutoencoder.load(tmp_path / "b").activation_mean).all() and last["step"] == 2
