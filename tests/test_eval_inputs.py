"""Bad inputs give one clear line; the held-out status says which rows the SAE trained on."""

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from eval_support import random_sae, write_rows_store, write_training_record

from saetron.eval.__main__ import cli, main
from saetron.eval.provenance import held_out, trained_on
from saetron.eval.store import open_store

D = 16


def rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def sae_dir(tmp_path):
    """An SAE trained (so its folder says) on layer 3 of test/tiny, from the store `train_store`."""
    folder = tmp_path / "sae"
    random_sae(D, 32, 4).save(folder)
    write_rows_store(tmp_path / "train_store", [rows(40), rows(30, 1)])
    write_training_record(folder, data_dir=str(tmp_path / "train_store"), target_layer=3, model="test/tiny")
    return folder


def fail(*argv) -> str:
    """The CLI's exit status and stderr on a bad input: 2 and one line, no traceback."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr):
        cli(list(argv))
    message = stderr.getvalue()
    assert exit_info.value.code == 2 and message.startswith("saetron-eval: error: ")
    assert message.count("\n") == 1 and message.endswith("\n")  # one line
    return message


def test_bad_inputs_exit_2_with_one_line(tmp_path, sae_dir):
    """The command itself (`python -m saetron.eval`): a store of another width, then a folder that is not a
    store; each ends with exit status 2 and one line on stderr."""
    wide = write_rows_store(tmp_path / "wide", [torch.randn(10, 2 * D)])
    for data_dir, expected in ((wide, f"reads d_in={D} activations but the store"),
                               (tmp_path, "manifest.json")):
        done = subprocess.run([sys.executable, "-m", "saetron.eval", "--sae", str(sae_dir), "--data_dir",
                               str(data_dir), "--output_dir", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("saetron-eval: error: ") and done.stderr.count("\n") == 1, done.stderr
        assert expected in done.stderr


def test_d_in_differs_from_the_store(tmp_path, sae_dir):
    store = write_rows_store(tmp_path / "wide", [torch.randn(10, 2 * D)])
    msg = fail("--sae", str(sae_dir), "--data_dir", str(store), "--output_dir", str(tmp_path / "o"))
    assert f"d_in={D}" in msg and f"d_model={2 * D}" in msg


@pytest.mark.parametrize("field, value", [("target_layer", 5), ("model", "other/model"),
                                          ("hook_point", "mlp_out")])
def test_store_of_another_layer_or_model(tmp_path, sae_dir, field, value):
    store = write_rows_store(tmp_path / "other", [rows(20)], **{field: value})
    argv = ["--sae", str(sae_dir), "--data_dir", str(store), "--output_dir", str(tmp_path / "o")]
    msg = fail(*argv)
    trained = {"target_layer": 3, "model": "test/tiny", "hook_point": "resid_post"}[field]
    assert f"{field}={trained!r}" in msg and f"{field}={value!r}" in msg and "--allow_mismatch" in msg
    result = main([*argv, "--allow_mismatch"])  # evaluated, the mismatch recorded
    assert result["warnings"] and field in result["warnings"][0]
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["warnings"] == result["warnings"]


def test_empty_store_and_missing_shards(tmp_path, sae_dir):
    empty = write_rows_store(tmp_path / "empty", [], d_model=D)
    out = ["--output_dir", str(tmp_path / "o")]
    assert "lists no shards" in fail("--sae", str(sae_dir), "--data_dir", str(empty), *out)
    assert "no manifest.json" in fail("--sae", str(sae_dir), "--data_dir", str(tmp_path), *out)
    store = write_rows_store(tmp_path / "two", [rows(5), rows(5)])
    msg = fail("--sae", str(sae_dir), "--data_dir", str(store), "--first_shard", "2", *out)
    assert "has 2 shards; pick 0..1" in msg


def test_model_of_another_store(tmp_path, sae_dir):
    msg = fail("--sae", str(sae_dir), "--data_dir", str(tmp_path / "train_store"), "--model",
               "some/other-model", "--output_dir", str(tmp_path / "o"))
    assert "'some/other-model'" in msg and "'test/tiny'" in msg


def test_held_out_status(tmp_path, sae_dir):
    trained = trained_on(sae_dir)
    assert (trained.model, trained.target_layer, trained.tokens) == ("test/tiny", 3, 70)
    own = tmp_path / "train_store"
    assert held_out(trained, open_store(own), 70)["held_out"] is False
    # the same text stream, longer: its rows from 70 on are new (the collector is deterministic)
    longer = write_rows_store(tmp_path / "longer", [rows(40), rows(30, 1), rows(25, 2)])
    status = held_out(trained, open_store(longer, first_shard=2), 25)
    assert status["held_out"] is True and "rows 70.." in status["why"]
    status = held_out(trained, open_store(longer, first_shard=1), 55)
    assert status["held_out"] is False and "rows 40..69" in status["why"]
    other = write_rows_store(tmp_path / "other_text", [rows(10, 3)], dataset="other")
    assert held_out(trained, open_store(other), 10)["held_out"] is True
    (sae_dir / "train_config.json").unlink()
    assert held_out(trained_on(sae_dir), open_store(other), 10)["held_out"] is None


def test_cli_max_tokens(tmp_path, sae_dir):
    argv = ["--sae", str(sae_dir), "--data_dir", str(tmp_path / "train_store"),
            "--output_dir", str(tmp_path / "o")]
    assert main([*argv, "--max_tokens", "none"])["tokens"] == 70
    result = main([*argv, "--max_tokens", "25", "--batch_size", "10"])
    assert result["tokens"] == 25 and result["held_out"] is False
    assert (tmp_path / "o" / "density.png").stat().st_size > 0 and (tmp_path / "o" / "l0_hist.png").is_file()
