"""Backend choice (saetron.kernels.dispatch): the rules, SAETRON_BACKEND, the density gate, errors."""

import logging
import types

import pytest
import torch

from saetron.kernels import dispatch, reference, torch_sparse
from saetron.kernels.dispatch import (
    BackendUnavailable,
    DensityGate,
    backend_ops,
    dense_width_threshold,
    resolve_backend,
)

FAKE_TRITON = types.SimpleNamespace(name="fake triton_ops")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("SAETRON_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_interpreting", lambda: False)  # as if triton were compiled
    monkeypatch.setattr(dispatch, "_logged", set())


@pytest.fixture
def triton_present(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_ops", lambda: FAKE_TRITON)


@pytest.fixture
def triton_absent(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_ops", lambda: None)


def test_auto_is_torch_on_cpu(triton_present):
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_auto_is_triton_on_cuda(triton_present):
    assert resolve_backend("auto", "cuda") == "triton"
    assert backend_ops("triton") is FAKE_TRITON


def test_auto_on_cuda_without_triton_falls_back_once(triton_absent, caplog):
    with caplog.at_level(logging.WARNING, logger="saetron.kernels.dispatch"):
        assert resolve_backend("auto", "cuda") == "torch"
        assert resolve_backend("auto", "cuda:0") == "torch"
    fallbacks = [r for r in caplog.records if "slower torch sparse path" in r.getMessage()]
    assert len(fallbacks) == 1


def test_explicit_backends_pass_through(triton_present):
    for device in ("cpu", "cuda"):
        assert resolve_backend("torch", device) == "torch"
        assert resolve_backend("reference", device) == "reference"
    assert resolve_backend("triton", "cuda") == "triton"


def test_triton_on_cpu_needs_the_interpreter(triton_present, monkeypatch):
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    monkeypatch.setattr(dispatch, "_interpreting", lambda: True)
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend("auto", "cpu") == "torch"  # the interpreter is for tests, never chosen by auto


def test_triton_without_the_kernels_is_an_error(triton_absent, monkeypatch):
    with pytest.raises(BackendUnavailable, match="does not import"):
        resolve_backend("triton", "cuda")
    monkeypatch.setattr(dispatch, "_interpreting", lambda: True)
    with pytest.raises(BackendUnavailable, match="does not import"):
        resolve_backend("triton", "cpu")


def test_environment_overrides(triton_present, monkeypatch):
    monkeypatch.setenv("SAETRON_BACKEND", "reference")
    assert resolve_backend("torch", "cpu") == "reference"
    assert resolve_backend("auto", "cuda") == "reference"
    monkeypatch.setenv("SAETRON_BACKEND", "torch")
    assert resolve_backend("reference", "cuda") == "torch"
    monkeypatch.setenv("SAETRON_BACKEND", "")  # empty: not set
    assert resolve_backend("reference", "cpu") == "reference"


def test_bad_names():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*allowed"):
        resolve_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="backend_ops takes 'reference', 'torch' or 'triton'; got 'auto'"):
        backend_ops("auto")


def test_bad_environment_name(monkeypatch):
    monkeypatch.setenv("SAETRON_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"SAETRON_BACKEND='fast' is not a backend"):
        resolve_backend("auto", "cpu")


def test_reference_and_torch_ops_modules():
    assert backend_ops("reference") is reference
    assert backend_ops("torch") is torch_sparse
    for ops in (reference, torch_sparse):
        for name in ("encode", "decode", "remove_parallel_grad_", "normalize_rows_"):
            assert callable(getattr(ops, name)), name


def test_triton_ops_interface_when_present(monkeypatch):
    """The Triton backend exposes the torch backend's four ops (skipped where triton_ops does not import)."""
    dispatch.triton_ops.cache_clear()  # (tests/conftest.py set TRITON_INTERPRET=1 before triton's import)
    ops = dispatch.triton_ops()
    if ops is None:
        pytest.skip("saetron.kernels.triton_ops does not import here")
    for name in ("encode", "decode", "remove_parallel_grad_", "normalize_rows_"):
        assert callable(getattr(ops, name)), name


def test_log_once(caplog):
    with caplog.at_level(logging.INFO, logger="saetron.kernels.dispatch"):
        for _ in range(3):
            dispatch.log_once("k", "fell back to %s", "dense", level=logging.INFO)
    assert [r.getMessage() for r in caplog.records] == ["fell back to dense"]


def test_density_gate(caplog):
    gate = DensityGate(50, threshold=10)
    cpu = torch.device("cpu")
    assert not gate.too_wide(10, cpu) and not gate.dense
    with caplog.at_level(logging.WARNING, logger="saetron.kernels.dispatch"):
        assert gate.too_wide(11, cpu) and gate.dense
        gate.too_wide(12, cpu)
    assert len(caplog.records) == 1
    values = torch.zeros(4, 20)
    values[1, :11] = 1.0  # widest token: 11 active latents (padding holds 0)
    gate.observe_dense(values)
    assert gate.dense
    values[1, 10] = 0.0
    gate.observe_dense(values)
    assert not gate.dense


def test_dense_width_thresholds_per_device():
    """512 of 4608 latents (measured on CPU); the CUDA entry is the same fraction, unmeasured."""
    assert dense_width_threshold(4608, "cpu") == 512
    assert dense_width_threshold(4608 * 8, "cuda") == 512 * 8
    assert DensityGate(4608)._threshold(torch.device("cpu")) == 512
