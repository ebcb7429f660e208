"""Errors a user can cause: a bad store, an unwritable output_dir, a bad batch, a NaN mid-run."""

import json

import pytest
import torch
from train_support import train_in_process, write_store

from saetron.kernels import reference
from saetron.sae import SparseAutoencoder
from saetron.sae.checkpoint import complete_checkpoints

FLAGS = ["--d_sae", "64", "--batch_size", "128", "--log_every", "2", "--max_steps", "4"]


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "store", [600, 500], d_model=16)


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no manifest.json in .*empty.* \(found nothing\).*saetron-collect"):
        train_in_process(tmp_path / "empty", tmp_path / "out", *FLAGS)
    with pytest.raises(ValueError, match=r"is not a folder"):
        train_in_process(tmp_path / "nowhere", tmp_path / "out", *FLAGS)


def test_missing_shard(store, tmp_path):
    (store / "shard_00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard_00001.safetensors listed in the manifest is missing.*--num"):
        train_in_process(store, tmp_path / "out", *FLAGS)
    assert train_in_process(store, tmp_path / "out", *FLAGS, "--num_shards", "1")["step"] == 4


def test_truncated_shard(store, tmp_path):
    path = store / "shard_00001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard_00001.safetensors is truncated: \d+ bytes on disk, its"):
        train_in_process(store, tmp_path / "out", *FLAGS)
    path.write_bytes(b"\x10")
    with pytest.raises(ValueError, match=r"no readable safetensors header"):
        train_in_process(store, tmp_path / "out", *FLAGS)


def test_foreign_manifest_and_too_many_shards(store, tmp_path):
    with pytest.raises(ValueError, match=r"--num_shards 3 but the store has 2 shards"):
        train_in_process(store, tmp_path / "out", *FLAGS, "--num_shards", "3")
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=r"expected format 'saetron-activations' version 2 or 3, got .* 1"):
        train_in_process(store, tmp_path / "out", *FLAGS)


def test_unwritable_output_dir(store, tmp_path):
    (tmp_path / "a_file").write_text("")  # a folder cannot be made under a file, even by root
    with pytest.raises(ValueError, match=r"--output_dir .*a_file/out.* is not writable"):
        train_in_process(store, tmp_path / "a_file" / "out", *FLAGS)


def test_batch_larger_than_data(store, tmp_path):
    with pytest.raises(ValueError, match=r"--batch_size 4096 exceeds the 1100 tokens"):
        train_in_process(store, tmp_path / "out", *FLAGS, "--batch_size", "4096")


def test_nan_stops_before_the_step_and_keeps_the_checkpoint(store, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train_in_process(store, out, *FLAGS, "--checkpoint_every", "2")
    good = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in good] == ["step_00000002", "step_00000004"]
    before = {p: sorted(f.name for f in p.iterdir()) for p in good}
    # Leftovers of crashed saves are never taken for checkpoints.
    (out / "checkpoints" / "step_00000099").mkdir()
    (out / "checkpoints" / "step_00000098.tmp").mkdir()

    real_decode = reference.decode  # the reference backend's decode (backend_ops returns the module)
    monkeypatch.setattr(reference, "decode", lambda code, W, bias: real_decode(code, W, bias) * float("nan"))
    with pytest.raises(RuntimeError, match=r"step 4: loss nan .* not finite; stopped before the optimizer"):
        train_in_process(store, out, *FLAGS, "--max_steps", "8", "--resume", "--backend", "reference")
    assert complete_checkpoints(out / "checkpoints") == good
    assert {p: sorted(f.name for f in p.iterdir()) for p in good} == before
    assert torch.isfinite(SparseAutoencoder.load(out).W_enc).all()
