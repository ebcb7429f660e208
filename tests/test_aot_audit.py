"""The AOT audit: every Triton kernel compiles for sm_90a and sm_80 at production shapes, no GPU needed.

The audit runs in a subprocess with TRITON_INTERPRET unset: triton builds its language interpreted
or compiled at its first import, and the interpreter tests of this suite need the interpreted one.
A first run compiles ~30 kernels (~1 min on 2 busy cores); results are cached on disk by kernel
source and compile inputs, so later runs take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# find_spec, not importorskip: importing triton here (compiled) would break the interpreter tests.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

KERNELS = {
    "decode_fwd", "decode_dvalues", "decode_dW_atomic", "decode_dW_sorted", "encoder_dW_db",
    "encoder_dshift_gemv", "decoder_remove_parallel", "decoder_normalize_rows",
    "select_hist_hi", "select_hist_lo", "select_resolve", "select_count", "select_emit_topk",
    "select_emit_threshold", "select_emit_batch", "adam", "decoder_adam", "decoder_grad_sq",
}
GEMM_KERNELS: set[str] = set()  # the encoder GEMM is cuBLAS: no Triton kernel is GEMM-shaped today
MMA_KERNELS = {"decode_dW_sorted", "encoder_dW_db"}  # segmented sums as tensor-core products
SMEM_PER_BLOCK = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "saetron.kernels.aot_audit", "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.stdout.strip(), f"the audit printed nothing; stderr:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = [(r["shape"], r["kernel"], r["arch"], r["failures"]) for r in rows if r["failures"]]
    assert proc.returncode == (1 if failures else 0), proc.stderr[-4000:]
    return rows


def test_every_kernel_is_audited_for_both_archs_and_shapes(rows):
    seen = {(r["shape"], r["kernel"], r["arch"]) for r in rows}
    expected = {(s, k, a) for s in ("smollm2", "deepseek") for k in KERNELS for a in ("sm_90a", "sm_80")}
    assert seen == expected
    assert {r["target"] for r in rows if r["arch"] == "sm_90a"} == {"sm_90a"}
    assert {r["target"] for r in rows if r["arch"] == "sm_80"} == {"sm_80"}


def test_no_spills_and_shared_memory_within_limits(rows):
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['shape']}"
        assert r["spill_bytes"] == 0 and r["local"] == 0, f"{where}: spills {r['spill_bytes']} B"
        assert 0 < r["regs"] <= 255, where
        assert r["smem_dynamic"] <= SMEM_PER_BLOCK[r["arch"]], f"{where}: {r['smem_dynamic']} B smem"
        assert r["failures"] == [], where


def test_gemm_kernels_are_flagged_and_use_tensor_cores(rows):
    assert {r["kernel"] for r in rows if r["gemm"]} == GEMM_KERNELS
    for r in rows:
        if r["kernel"] in GEMM_KERNELS:
            assert r["tensor_core"], f"{r['kernel']} {r['arch']}: no tensor-core instruction in the PTX"
        if r["kernel"] in MMA_KERNELS:
            assert r["tensor_core"] or r["mma_sync"], f"{r['kernel']} {r['arch']}: no mma in the PTX"
