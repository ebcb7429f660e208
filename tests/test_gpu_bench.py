"""The GPU benchmark's command in a CPU dry run: every section's code path, before a GPU run spends budget.

`bash bench/gpu/run.sh --dry-run` runs the table, profile, kernels, train and collect sections at tiny
shapes on CPU (the Triton kernels interpreted) exactly as the GPU run does at full size, and writes the
same JSON. ~60-90 s on 2 cores: most of it Python start-ups, the interpreted encode, and the export of the
SmolLM2 tokenizer from its GGUF (~9 s) that the collect section reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "BENCH_WORK": str(out / "work"),
           "TOKENIZER": str(out / "work" / "tokenizer"), "SECTIONS": "table profile kernels train collect",
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "run.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_dry_run_passes_every_section(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for section in ("table", "profile", "kernels", "train", "collect"):
        assert f"section {section}: exit 0" in proc.stdout
    assert "== step table" in proc.stdout and "== trainer:" in proc.stdout and "== collector" in proc.stdout


def test_dry_run_writes_the_results(dry_run):
    _, out = dry_run
    env = json.loads((out / "env.json").read_text())
    assert env["saetron_from"].endswith("/saetron/kernels"), "saetron must come from run.sh's symlink tree"
    table = json.loads((out / "step_table.json").read_text())
    providers = {r["provider"]: r for r in table["records"]}
    expected = {"cublas_gemm", "saetron_auto", "saetron_triton", "saetron_reference", "sparsify"}
    assert set(providers) == expected
    for name, r in providers.items():
        assert "error" not in r and "skipped" not in r, (name, r)
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
        if name.startswith("saetron"):
            assert r["l0"] == pytest.approx(r["k"]), name
    kernels = json.loads((out / "kernels.json").read_text())
    names = {r["kernel"] for r in kernels["rows"]}
    assert {"latent_csr", "decode_fwd", "decode_dvalues", "dW_dec", "dW_enc", "decoder_adam", "adam_W_enc",
            "saeadam_clip_step", "unfused_clip_step"} <= names
    assert all(r["rel_err"] < 1e-2 for r in kernels["rows"] if "rel_err" in r), "a launch config disagrees"
    profile = json.loads((out / "profile.json").read_text())
    assert profile["rows"] and profile["table"]
    train = json.loads((out / "train.json").read_text())
    assert train["tokens_per_s"] > 0 and [r["step"] for r in train["records"]] == [2, 4, 6]
    collected = json.loads((out / "collect.json").read_text())
    rows = collected["batches"] * collected["shape"]["batch"] * (collected["shape"]["context"] - 1)
    assert collected["batches"] == 6 and 0.9 * rows < collected["tokens"] <= rows  # EOS rows are left out
    assert collected["bare_tok_s"] > 0 and collected["disk_write_mb_s_fsync"] > 0
    assert collected["check"]["ok"] and collected["check"]["bf16_max_abs_diff"] == 0  # float32 on CPU
    for name, bytes_per_row in (("collect", 4 * 64), ("collect_fp8", 64 + 4)):  # + token id and position
        r = collected[name]
        assert r["tok_s"] > 0 and r["ratio"] > 0 and r["steady_ratio"] > 0 and r["startup_s"] >= 0
        per_row = r["bytes"] / collected["tokens"]  # + the shard headers, under a byte a row at this size
        assert bytes_per_row + 8 < per_row < bytes_per_row + 9
        assert [run["forwards"] for run in collected["runs"][name]] == [6]
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert files <= {"env.json", "run.log", "step_table.json", "profile.json", "kernels.json", "train.json",
                     "collect.json", "tests.txt"}, "the device tool returns at most 8 files from $OUT"
