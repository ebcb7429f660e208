"""Checkpoint and resume in one process: a run stopped after a checkpoint and resumed is the same run."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_support import read_metrics, train_in_process, write_store

from saetron.sae.checkpoint import complete_checkpoints

# 16 steps per epoch; warm-ups and a short dead window so that every piece of state matters on resume.
FLAGS = ["--d_sae", "96", "--batch_size", "256", "--lr", "1e-2", "--log_every", "2", "--lr_warmup_steps", "3",
         "--l1_warmup_steps", "5", "--l1_coeff", "3e-2", "--dead_window", "1024", "--shuffle_buffer", "2048"]


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    store = write_store(tmp_path / "store", [2100, 1996], d_model=24)
    full, part = tmp_path / "full", tmp_path / "part"
    train_in_process(store, full, *FLAGS)
    train_in_process(store, part, *FLAGS, "--max_steps", "8", "--checkpoint_every", "3",
                     "--keep_checkpoints", "2")
    assert [p.name for p in complete_checkpoints(part / "checkpoints")] == ["step_00000006", "step_00000008"]
    with pytest.raises(ValueError, match=r"settings .* differ from this run's"):
        train_in_process(store, part, *FLAGS, "--resume", "--lr", "2e-2")
    train_in_process(store, part, *FLAGS, "--resume", "latest")

    # Same batches, same weights, same optimizer state: bit-identical on the same machine and threads.
    a, b = read_metrics(full), read_metrics(part)
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in a] == \
        [{k: v for k, v in m.items() if k not in drop} for m in b]
    for name in ("sae.safetensors", "saelens/sparsity.safetensors"):
        ours, theirs = load_file(full / name), load_file(part / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert (part / "checkpoints" / "step_00000016" / ".metadata").is_file()


def test_metrics_after_a_kill_and_resume_have_each_step_once(tmp_path):
    store = write_store(tmp_path / "store", [2100, 1996], d_model=24)
    out = tmp_path / "out"
    train_in_process(store, out, *FLAGS, "--max_steps", "10", "--checkpoint_every", "6")
    # What a kill -9 at step 10 leaves: metrics logged up to step 10 (the last one cut mid-line), the
    # checkpoint of step 10 never completed; the newest complete one is step 6.
    shutil.rmtree(out / "checkpoints" / "step_00000010")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 0.')
    train_in_process(store, out, *FLAGS, "--max_steps", "12", "--resume")
    assert [m["step"] for m in read_metrics(out)] == [2, 4, 6, 8, 10, 12]
