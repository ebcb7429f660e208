"""The trainer as a user meets it: one-line errors with exit status 2 (one process and torchrun), --help
with defaults, a finished run recognised without loading anything, readable outputs."""

import json
import logging
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
from train_support import REPO, torchrun, train_in_process, write_store

from saetron.collect.cli import exit_status
from saetron.sae import data as data_module
from saetron.sae import train as train_module

FLAGS = ["--d_sae", "64", "--batch_size", "128", "--log_every", "2", "--max_steps", "4"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store"), [600, 500], d_model=16)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saetron.sae.train", *args], cwd=REPO, capture_output=True,
                          text=True)


@pytest.mark.parametrize("flags, message", [
    (["--data_dir", "NOWHERE"], r"'NOWHERE' is not a folder: expected an activation store"),
    (["--activation", "topk"],
     r"activation='topk' needs k, an int in \[1, d_sae=64\] \(active latents per token\); got k=None"),
    (["--batch_size", "4096"], r"--batch_size 4096 exceeds the 1100 tokens of the chosen shards"),
])
def test_usage_errors_are_one_line_with_status_2(store, tmp_path, flags, message):
    args = ["--data_dir", str(store), "--output_dir", str(tmp_path / "out"), *FLAGS, *flags]
    done = run_cli(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert re.match(rf"saetron-train: error: .*{message}", lines[0]), lines[0]


def test_usage_error_under_torchrun_is_one_line_per_rank(store, tmp_path):
    done = torchrun(2, store, tmp_path / "out", *FLAGS, "--batch_size", "255")
    ours = [line for line in done.stderr.splitlines() if line.startswith("saetron-train:")]
    # Every rank prints its line; torchrun stops the other rank as soon as the first one exits, so one
    # or both lines arrive.
    expected = "saetron-train: error (rank {}): --batch_size 255 is the global batch; it must divide by " \
               "the 2 ranks: use a multiple of 2"
    assert 1 <= len(ours) <= 2 and set(ours) <= {expected.format(r) for r in (0, 1)}, done.stderr
    assert "[rank0]:" not in done.stderr and "[rank1]:" not in done.stderr  # no worker traceback
    assert "exitcode  : 2" in done.stderr  # torchrun's own summary of the failed workers


def test_bugs_keep_their_traceback(capsys):
    try:
        np.zeros(-1)  # a ValueError raised by a library, not by saetron's checks: a bug
    except ValueError as error:
        assert exit_status(error, "prog") == 1
    assert "Traceback" in capsys.readouterr().err
    try:
        data_module.check_batch_size(10, 20, 1)  # raised by saetron's own check
    except ValueError as error:
        assert exit_status(error, "prog") == 2
    assert capsys.readouterr().err == "prog: error: --batch_size 20 exceeds the 10 tokens of the chosen " \
                                      "shards; use a smaller batch or more shards\n"


def test_help_shows_defaults():
    done = run_cli("--help")
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert "--batch_size BATCH_SIZE Global batch in tokens (all ranks together); must divide by the " \
           "number of ranks. (default: 4096)" in text
    assert "(required)" in text
    assert "--lr LR Peak Adam learning rate. Not given: 2e-4 / sqrt(d_sae / 2^14)" in text


def test_a_finished_run_is_recognised_without_loading_anything(store, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    first = train_in_process(store, out, *FLAGS, "--resume")
    monkeypatch.setattr(train_module, "init_distributed", lambda: pytest.fail("a finished run started ranks"))
    with caplog.at_level(logging.INFO):
        again = train_in_process(store, out, *FLAGS, "--resume")
    assert again == json.loads(json.dumps(first))
    assert "finished at step 4 and exported: nothing to do" in caplog.text
    monkeypatch.undo()
    assert train_in_process(store, out, *FLAGS, "--resume", "--max_steps", "6")["step"] == 6  # trains on


def test_outputs_are_readable_by_others_and_saelens_cfg_says_how_activations_were_made(store, tmp_path):
    out = tmp_path / "out"
    train_in_process(store, out, *FLAGS)
    for path in ("sae.safetensors", "sae_config.json", "saelens/cfg.json", "saelens/sae_weights.safetensors",
                 "saelens/sparsity.safetensors"):
        assert stat.S_IMODE(os.stat(out / path).st_mode) == 0o644, path
    metadata = json.loads((out / "saelens" / "cfg.json").read_text())["metadata"]
    made = (metadata["context_size"], metadata["dataset_path"], metadata["prepend_bos"])
    assert made == (64, "synthetic", True)
    assert (metadata["model_name"], metadata["hook_name"]) == ("test/tiny", "blocks.3.hook_resid_post")


def test_log_lines_say_progress_and_eta(store, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train_in_process(store, tmp_path / "out", *FLAGS)
    lines = [r.message for r in caplog.records if r.message.startswith("step ")]
    assert len(lines) == 2 and re.search(r"\|  50% \| eta \d+m \d\ds$", lines[0]), lines
    assert lines[1].endswith("| 100% | eta 0m 00s")
    # 4 steps of 128 tokens against the default 1M-token window: the log says dead_fraction means nothing
    assert "--dead_window 1000000 tokens is longer than this run (512 tokens)" in caplog.text
