"""The collector as a user meets it: one-line errors with exit status 2, progress lines off a terminal,
non-finite rows left out and named."""

import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from transformers import AutoTokenizer

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.collect.model import LayerHook, resolve_model

SETTINGS = dict(target_layer=1, context_size=24, batch_size=2, max_tokens=150, shard_tokens=60)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saetron.collect", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["--model", "./no/such/model", "--target_layer", "1"], r"--model ./no/such/model: no such file or "),
    (["--model", "x", "--target_layer", "-1"], r"target_layer=-1: expected a layer index >= 0"),
    (["--repair"], r"'.*NOWHERE' is not a folder: expected an activation store"),
])
def test_usage_errors_are_one_line_with_status_2(args, message, tmp_path):
    folder = str(tmp_path / "NOWHERE")
    done = run_cli(*args, folder) if args == ["--repair"] else run_cli(*args, "--output_dir", folder)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"saetron-collect: error: {message}", lines[0]), done.stderr


def test_missing_flags_are_named(tmp_path):
    done = run_cli("--model", "x")
    assert done.returncode == 2 and "the following arguments are required: --target_layer, --output_dir" \
        in done.stderr


def test_model_paths():
    assert resolve_model("org/name") == ("org/name", None)  # a hub id
    with pytest.raises(ValueError, match="no such file or folder"):
        resolve_model("~/no/such/folder")


def test_progress_lines_off_a_terminal(tiny_llama, docs_jsonl, tmp_path, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="saetron.collect.collector"):
        collect(CollectConfig(model=tiny_llama, dataset=docs_jsonl, output_dir=str(tmp_path),
                              log_every_seconds=0, **SETTINGS))
    lines = [r.message for r in caplog.records if r.message.startswith("collect:")]
    pattern = (r"collect: [\d,]+ / 150 tokens \(\d+\.\d%\) \| [\d,]+ tok/s \| [\d,]+ MB written "
               r"\| ETA \d+m \d\ds")
    assert len(lines) >= 3 and all(re.fullmatch(pattern, line) for line in lines), lines


def test_nonfinite_rows_are_left_out_and_named(tiny_llama, docs_jsonl, tmp_path, monkeypatch, caplog):  # noqa: F811
    capture = LayerHook.capture
    poisoned = []

    def capture_with_a_nan(self, model, input_ids):  # the first window's token at position 5 turns NaN
        out = capture(self, model, input_ids)[0].clone()
        if not poisoned:
            out[0, 5, 3] = math.nan
            poisoned.append(int(input_ids[0, 5]))
        return [out]

    monkeypatch.setattr(LayerHook, "capture", capture_with_a_nan)
    with caplog.at_level(logging.WARNING):
        manifest = collect(CollectConfig(model=tiny_llama, dataset=docs_jsonl, output_dir=str(tmp_path),
                                         **SETTINGS))
    token = AutoTokenizer.from_pretrained(tiny_llama).decode(poisoned)
    assert "shard_00000.safetensors: left out 1 row(s) of " in caplog.text
    assert f"{token!r} at position 5" in caplog.text
    assert [s["nonfinite_rows"] for s in manifest["shards"]] == [1] + [0] * (len(manifest["shards"]) - 1)
    with open(os.path.join(tmp_path, "manifest.json")) as f:
        assert json.load(f) == manifest
    from saetron.collect.store import ActivationStore

    store = ActivationStore(tmp_path)
    assert all(torch.isfinite(rows.activations).all() for rows in store.iter_rows(rows_per_read=50))
