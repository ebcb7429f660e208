"""Training straight from the model (--model): the same batches and loss trajectory, bit for bit, as training
from a store collected with the same settings and read with the same seed and buffer size; after a kill -9
and --resume too. --eval_tokens holds out the stream's first forward batches."""

import json
import os
import subprocess
import sys

import pytest
import torch
from collect_fixtures import DOCS, _seed_and_offline, tiny_llama, write_jsonl  # noqa: F401
from safetensors.torch import load_file
from train_support import REPO, read_metrics

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.sae import live
from saetron.sae.checkpoint import CRASH_ENV, complete_checkpoints, load_rank_state
from saetron.sae.train import main

# Batches of 64 rows from buffers of 200: batches span buffers, and the resume at step 8 (row 512) starts
# inside buffer 2, itself starting inside a forward batch (2 windows of 24 tokens, ~46 kept rows).
TRAIN = ["--d_sae", "96", "--batch_size", "64", "--lr", "1e-2", "--log_every", "2", "--max_steps", "12",
         "--buffer_tokens", "200", "--stats_tokens", "150", "--activation", "topk", "--k", "8",
         "--checkpoint_every", "4", "--seed", "3"]
# --eval_tokens 0: the whole text trains, as the store run's first rows do
LIVE = ["--target_layer", "2", "--context_size", "24", "--model_batch_size", "2", "--eval_tokens", "0"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    return write_jsonl(str(tmp_path_factory.mktemp("text") / "docs.jsonl"), DOCS * 4)  # ~2,400 rows


@pytest.fixture(scope="module")
def from_store(tiny_llama, text, tmp_path_factory):  # noqa: F811
    """The reference: a store of the same settings, trained on in the buffered order."""
    root = tmp_path_factory.mktemp("from_store")
    os.environ["HF_HUB_OFFLINE"] = "1"
    collect(CollectConfig(model=tiny_llama, dataset=text, target_layer=2, context_size=24, batch_size=2,
                          max_tokens=10**6, shard_tokens=300, output_dir=str(root / "store")))
    main(["--data_dir", str(root / "store"), "--output_dir", str(root / "sae"), *TRAIN])
    return root / "sae"


def same_run(a, b) -> None:
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(a)] == \
        [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(b)]
    ours, theirs = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_live_training_equals_training_from_the_store(tiny_llama, text, from_store, tmp_path,  # noqa: F811
                                                       monkeypatch):
    out = str(tmp_path / "live")
    command = ["--model", tiny_llama, "--dataset", text, *LIVE, "--output_dir", out, *TRAIN]
    main(command)
    assert [m["step"] for m in read_metrics(tmp_path / "live")] == [2, 4, 6, 8, 10, 12]
    same_run(tmp_path / "live", from_store)
    state = load_rank_state(tmp_path / "live" / "checkpoints" / "step_00000012", 0)
    assert state["buffer"] == 12 * 64 // 200 and set(state["position"]) == {"chunk", "skip"}
    # A --resume of the finished run recognises it without loading the model.
    monkeypatch.setattr(live, "load_model", lambda *a, **k: pytest.fail("a finished run loaded the model"))
    assert main(command + ["--resume"])["step"] == 12


def test_killed_live_run_resumes_exactly(tiny_llama, text, from_store, tmp_path):  # noqa: F811
    out = tmp_path / "live"
    command = [sys.executable, "-m", "saetron.sae.train", "--model", tiny_llama, "--dataset", text, *LIVE,
               "--output_dir", str(out), *TRAIN]
    killed = subprocess.run(command, cwd=REPO, env={**os.environ, CRASH_ENV: "8"}, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL right after the checkpoint of step 8
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_00000004", "step_00000008"]
    position = load_rank_state(out / "checkpoints" / "step_00000008", 0)
    assert position["buffer"] == 2 and position["position"]["skip"] > 0  # inside a forward batch
    resumed = subprocess.run(command + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert [m["step"] for m in read_metrics(out)] == [2, 4, 6, 8, 10, 12]  # each step once
    same_run(out, from_store)


def test_live_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match="give --data_dir STORE .* or --model SPEC .*, not neither"):
        main(["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="not both"):
        main(["--output_dir", str(tmp_path), "--data_dir", "x", "--model", "y"])
    with pytest.raises(ValueError, match="it needs --target_layer and --max_steps"):
        main(["--output_dir", str(tmp_path), "--model", "y"])
    with pytest.raises(ValueError, match=r"--model /no/such/model: no such file or folder"):
        main(["--output_dir", str(tmp_path), "--model", "/no/such/model", "--target_layer", "1",
              "--max_steps", "3"])


def test_held_out_rows_are_the_first_forward_batches(tiny_llama, text, from_store, tmp_path,  # noqa: F811
                                                       monkeypatch):
    """--eval_tokens with --model: the first forward batches holding >= N rows are held out, and training's
    stream starts right after them; compared with the store of the same settings (the same rows in the
    same order). The run evaluates them at the end (eval.json, the final line); a finished run's re-run
    reads eval.json without loading the model."""
    from saetron.collect.store import ActivationStore
    from saetron.sae.buffer import buffer_permutation
    from saetron.sae.distributed import DistEnv
    from saetron.sae.train_config import TrainConfig

    store = ActivationStore(from_store.parent / "store")
    stored = torch.cat([rows.activations for rows in store.iter_rows()])  # [~2400, d] in stream order
    cfg = TrainConfig(output_dir=str(tmp_path / "o"), model=tiny_llama, dataset=text, target_layer=2,
                      context_size=24, model_batch_size=2, max_steps=12, batch_size=64, buffer_tokens=200,
                      seed=3, eval_tokens=100)
    source = live.LiveSource(cfg, DistEnv(0, 1, torch.device("cpu")))
    try:
        held = torch.cat(source.held)
        r = len(held)
        assert 100 <= r < 100 + len(source.held[-1])  # whole forward batches, the last one reaching 100
        assert torch.equal(held, stored[:r].float())
        # the training stream's first buffer: stream rows [r, r + 200), permuted by (seed, rank 0, buffer 0)
        first = source.first_rows(200, 12)
        perm = torch.from_numpy(buffer_permutation(3, 0, 0, 200))
        assert torch.equal(first.float(), stored[r:r + 200][perm])
    finally:
        source.close()

    out = tmp_path / "live"
    command = ["--model", tiny_llama, "--dataset", text, *LIVE, "--output_dir", str(out), *TRAIN,
               "--eval_tokens", "100"]
    last = main(command)
    figures = last["held_out"]
    assert figures["tokens"] == r
    assert figures["held_out"]["what"].startswith(f"the first {r} rows of the text")
    assert json.loads((out / "eval.json").read_text()) == figures
    monkeypatch.setattr(live, "load_model", lambda *a, **k: pytest.fail("a finished run loaded the model"))
    assert main(command + ["--resume"])["held_out"] == figures
