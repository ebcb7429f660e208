"""--eval_tokens: the store's last shards are held out from training, exactly, and the exported SAE is
evaluated on them with saetron.eval's figures (eval.json, the final line)."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from train_support import torchrun, train_in_process, write_store

from saetron.eval.__main__ import main as eval_main
from saetron.sae.train_config import TrainConfig

SHARDS = [500, 500, 500, 500, 300]  # 2300 tokens: the default 5% (115) takes the last shard, 13% of them
FLAGS = ["--d_sae", "48", "--activation", "topk", "--k", "4", "--batch_size", "200", "--log_every", "5",
         "--seed", "3"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    # `first4` holds the same rows as the first four shards of `full` (write_store seeds each shard by its
    # index), and nothing else
    return (write_store(root / "full", SHARDS, d_model=16),
            write_store(root / "first4", SHARDS[:4], d_model=16))


def test_the_slice_is_excluded_exactly_and_evaluated(stores, tmp_path, caplog):
    full, first4 = stores
    caplog.set_level(logging.INFO)
    last = train_in_process(full, tmp_path / "held", *FLAGS)
    assert "held out from training: shards 4..4" in caplog.text
    final = [r.getMessage() for r in caplog.records if r.getMessage().startswith("final |")]
    # training = the four first shards alone: 2000 // 200 = 10 steps, and the very same SAE as a run on a
    # store of those shards only (same seed, rows and order): the held-out rows never reached it
    assert last["step"] == 10
    alone = train_in_process(first4, tmp_path / "alone", *FLAGS, "--eval_tokens", "0")
    assert alone["step"] == 10 and "held_out" not in alone
    for key, value in load_file(tmp_path / "held" / "sae.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "alone" / "sae.safetensors")[key]), key
    assert json.loads((tmp_path / "held" / "train_config.json").read_text())["train_shards"] == 4

    figures = json.loads((tmp_path / "held" / "eval.json").read_text())
    assert figures["tokens"] == 300 and figures["held_out"]["shards"] == ["shard_00004.safetensors"]
    assert last["held_out"] == figures
    assert len(final) == 1 and "held out: shards 4..4, 300 tokens" in final[0]
    assert f"explained variance {figures['explained_variance']:.4f}" in final[0]
    # `python -m saetron.eval` on the same shards: the same figures, and it knows they are held out
    cli = eval_main(["--sae", str(tmp_path / "held"), "--data_dir", str(full), "--first_shard", "4",
                     "--output_dir", str(tmp_path / "eval")])
    assert cli["held_out"] is True
    for key in ("tokens", "explained_variance", "explained_variance_typical", "l0", "dead_fraction"):
        assert cli[key] == figures[key], key  # the same code over the same rows in the same batches

    # a finished run: nothing trained, eval.json reused (not rewritten), the same final line
    written = (tmp_path / "held" / "eval.json").stat().st_mtime_ns
    caplog.clear()
    again = train_in_process(full, tmp_path / "held", *FLAGS, "--resume")
    assert "nothing to do" in caplog.text and again["held_out"] == figures
    assert (tmp_path / "held" / "eval.json").stat().st_mtime_ns == written
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("final |")] == final


def test_slice_sizes(stores, tmp_path):
    full, first4 = stores
    from saetron.collect.store import ActivationStore
    from saetron.sae.held_out import held_out_count, live_eval_tokens

    store = ActivationStore(full)

    def count(**flags) -> int:
        return held_out_count(TrainConfig(output_dir="o", data_dir=str(full), **flags), store)[0]

    assert count() == 1 and count(eval_tokens=0) == 0
    assert count(eval_tokens=300) == 1 and count(eval_tokens=301) == 2 and count(eval_tokens=1800) == 4
    assert held_out_count(TrainConfig(output_dir="o", data_dir=str(first4)), ActivationStore(first4))[0] == 1
    three = ActivationStore(full, num_shards=3)  # its last shard holds 500 of 1500 tokens: over a quarter
    count3, why = held_out_count(TrainConfig(output_dir="o", data_dir=str(full), num_shards=3), three)
    assert count3 == 0 and "over a quarter of the store" in why
    with pytest.raises(ValueError, match="are all 5 chosen shards .2300 tokens., leaving none to train on"):
        count(eval_tokens=1801)
    live = {"output_dir": "o", "model": "m", "target_layer": 1, "batch_size": 64}
    assert live_eval_tokens(TrainConfig(**live, max_steps=12)) == 39  # 5% of 768, rounded up
    assert live_eval_tokens(TrainConfig(**live, max_steps=10**6)) == 1 << 16
    assert live_eval_tokens(TrainConfig(**live, max_steps=12, eval_tokens=0)) == 0
    with pytest.raises(ValueError, match=r"exceeds the 2000 tokens .* \(held out from training: shards 4..4"):
        train_in_process(full, tmp_path / "big", *FLAGS, "--batch_size", "2100")


def test_two_ranks_evaluate_on_rank_0_after_the_group_is_gone(stores, tmp_path):
    """Under torchrun the slice is excluded on every rank and rank 0 alone evaluates it, after the clean
    shutdown (barrier, group destroyed): exit status 0, one final line, eval.json of the slice; the same
    training rows as one process (rank count does not change the data, data.py)."""
    full, _ = stores
    done = torchrun(2, full, tmp_path / "two", *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    final = [line for line in done.stderr.splitlines() if "final |" in line]
    assert len(final) == 1 and "held out: shards 4..4, 300 tokens" in final[0], done.stderr[-3000:]
    assert "held out from training: shards 4..4 (300 tokens of 2300)" in done.stderr
    figures = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert figures["tokens"] == 300 and f"explained variance {figures['explained_variance']:.4f}" in final[0]
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 10
