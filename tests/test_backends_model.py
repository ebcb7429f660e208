"""SparseAutoencoder's one forward on the sparse backends against the reference backend: outputs,
losses, gradients; backend auto's per-batch fallback to the reference backend.

The triton case runs the kernels under the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1 before triton's first import).
"""

import logging

import pytest
import torch

from saetron.kernels import dispatch, reference
from saetron.kernels.dispatch import BackendUnavailable
from saetron.kernels.sparse_code import SparseCode
from saetron.sae import SparseAutoencoder, fired_latents

NORMALIZATIONS = ("expected_average_only_in", "layer_norm", "none")
# Relative to the largest entry of the reference tensor (losses: relative to themselves).
# fp64: another summation order only; fp32: sums over up to B = 4096 products, ~sqrt(B) * 2^-23
# ~ 8e-6 relative, so 5e-5 (see tests/test_torch_backend.py).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("SAETRON_BACKEND", raising=False)


def on_grid(t, step=2.0**-6):
    """Values on a 2^-6 grid. Every backend computes the same addmm(b_enc, x - shift, W_enc) (the
    unchunked sparse encode and the dense reference alike), so their pre-activations are bit-identical
    and a topk selection compares exactly; the grid also keeps the dense oracle `sae.encode`, which
    subtracts (x - mean) - b_dec in two steps, exact."""
    return torch.round(t / step) * step


def make_pair(d_in, d_sae, activation, normalization, apply_b_dec, dtype, k=None, b_enc=-3.1):
    """Two identical SAEs, backend reference and torch, with data-like statistics; and a batch maker.

    Kaiming W_enc gives pre-activations of std ~1.4 on unit-variance centered inputs: b_enc = -3.1
    puts ReLU's L0 near 1.4% of d_sae (64 of 4608). TopK gets b_enc ~ -0.5, so that the batch's
    first token, whose encoder input is 0 (its pre-activation is b_enc), has no active latent.
    """
    ref = SparseAutoencoder(d_in, d_sae, normalization, apply_b_dec, activation=activation, k=k,
                            backend="reference", dtype=dtype)
    mean = on_grid(torch.randn(d_in, dtype=dtype) * 0.5)
    with torch.no_grad():
        ref.b_enc.copy_(torch.randn(d_sae, dtype=dtype) * 0.1 + (b_enc if activation == "relu" else -0.5))
        ref.b_dec.copy_(on_grid(torch.randn(d_in, dtype=dtype) * 0.1))
        ref.activation_mean.copy_(mean)
    ours = SparseAutoencoder(d_in, d_sae, normalization, apply_b_dec, activation=activation, k=k,
                             backend="torch", dtype=dtype)
    ours.load_state_dict(ref.state_dict())

    def batch(B):
        x = on_grid(torch.randn(B, d_in, dtype=dtype) + mean)
        centered = {"expected_average_only_in": mean, "layer_norm": 0.0, "none": 0.0}[normalization]
        x[0] = centered + ref.b_dec.detach() * apply_b_dec if normalization != "layer_norm" else 0.0
        return x

    return ref, ours, batch


def assert_same_step(ref, ours, x, dtype):
    """Forward, loss_dict, backward and the decoder-gradient projection agree on both backends."""
    tol = TOLERANCE[dtype]
    outputs = []
    for sae in (ref, ours):
        sae.zero_grad(set_to_none=True)
        reconstructed, features, loss_dict = sae(x)
        loss_dict["loss"].backward()
        outputs.append((reconstructed.detach(), features, loss_dict))
    (rec_ref, f_ref, losses_ref), (rec, f, losses) = outputs
    assert isinstance(f, SparseCode) and isinstance(f_ref, torch.Tensor)
    torch.testing.assert_close(f.to_dense(ref.d_sae).detach(), f_ref.detach(), rtol=0, atol=0)
    assert torch.equal(fired_latents(f, ref.d_sae), fired_latents(f_ref, ref.d_sae))
    scale = rec_ref.abs().max().item()
    torch.testing.assert_close(rec, rec_ref, rtol=0, atol=tol * scale)
    assert losses.keys() == losses_ref.keys()
    for name, value in losses_ref.items():
        # explained_variance is computed in fp32 on every backend: fp32's tolerance
        rtol = TOLERANCE[torch.float32] if name == "explained_variance" else tol
        actual, expected = losses[name].detach(), value.detach()
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 1e-3, msg=name)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g_ref, g = getattr(ref, name).grad, getattr(ours, name).grad
        scale = g_ref.abs().max().item() or 1.0
        torch.testing.assert_close(g, g_ref, rtol=0, atol=tol * scale, msg=f"grad {name}")
    for sae in (ref, ours):
        sae.remove_parallel_decoder_grad()
    # the reference projects in fp32 whatever the dtype: fp32's tolerance
    scale = ref.W_dec.grad.abs().max().item() or 1.0
    torch.testing.assert_close(ours.W_dec.grad, ref.W_dec.grad, rtol=0, atol=TOLERANCE[torch.float32] * scale)


@pytest.mark.parametrize(
    "activation, normalization, apply_b_dec",
    [
        ("topk", "expected_average_only_in", True),
        ("topk", "layer_norm", False),
        ("relu", "expected_average_only_in", False),
        ("relu", "layer_norm", True),
    ],
)
def test_real_size_fp32(activation, normalization, apply_b_dec):
    """d=576, d_sae=4608, B=4096, TopK k=64 / ReLU at L0 ~64."""
    k = 64 if activation == "topk" else None
    ref, ours, batch = make_pair(576, 4608, activation, normalization, apply_b_dec, torch.float32, k=k)
    x = batch(4096)
    assert_same_step(ref, ours, x, torch.float32)
    if activation == "relu":
        l0 = ref(x)[2]["l0"].item()
        assert 30 < l0 < 130, f"the test wants L0 ~64; got {l0}"


@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_every_mode_fp64(activation, normalization, apply_b_dec):
    k = 8 if activation == "topk" else None
    ref, ours, batch = make_pair(96, 400, activation, normalization, apply_b_dec, torch.float64, k=k,
                                 b_enc=-1.0)
    assert_same_step(ref, ours, batch(64), torch.float64)


def test_k_equals_d_sae():
    ref, ours, batch = make_pair(24, 40, "topk", "expected_average_only_in", True, torch.float64, k=40)
    assert_same_step(ref, ours, batch(16), torch.float64)


def test_decoder_norm_methods_match():
    ref, ours, _ = make_pair(64, 300, "relu", "none", False, torch.float32)
    with torch.no_grad():
        ref.W_dec.mul_(torch.rand(300, 1) + 0.5)
        ours.W_dec.copy_(ref.W_dec)
    for sae in (ref, ours):
        sae.normalize_decoder()
    torch.testing.assert_close(ours.W_dec, ref.W_dec, rtol=0, atol=1e-6)  # fp32 rows of norm ~1


def test_leading_dims_and_backward_on_torch():
    _, ours, _ = make_pair(32, 96, "topk", "layer_norm", True, torch.float32, k=4)
    reconstructed, features, loss_dict = ours(torch.randn(2, 5, 32))
    assert reconstructed.shape == (10, 32) and features.indices.shape == (10, 4)
    loss_dict["loss"].backward()
    assert all(p.grad is not None for p in (ours.W_enc, ours.b_enc, ours.W_dec, ours.b_dec))


def test_environment_overrides_the_model(monkeypatch):
    _, ours, batch = make_pair(32, 96, "topk", "none", False, torch.float32, k=4)
    assert isinstance(ours(batch(8))[1], SparseCode)
    monkeypatch.setenv("SAETRON_BACKEND", "reference")
    assert isinstance(ours(batch(8))[1], torch.Tensor)


def test_triton_model_on_cpu(monkeypatch):
    """Building works (the decoder is normalized with the torch ops, logged); the forward is an error."""
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(dispatch, "_interpreting", lambda: False)  # as if triton were compiled
    sae = SparseAutoencoder(32, 64, backend="triton")
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        sae(torch.randn(4, 32))


def test_auto_density_gate(monkeypatch, caplog):
    """auto runs a batch on the reference backend while codes are wider than the threshold, then sparse
    again; same results, and the features stay a SparseCode."""
    monkeypatch.setattr(dispatch, "_logged", set())
    ref, ours, batch = make_pair(48, 200, "relu", "expected_average_only_in", False, torch.float64, b_enc=0.0)
    ours.backend = "auto"
    ours._density_gate.threshold = 40
    calls = []
    monkeypatch.setattr(reference, "encode", _counting(reference.encode, calls))
    x = batch(32)
    with caplog.at_level(logging.WARNING, logger="saetron.kernels.dispatch"):
        for _ in range(2):  # b_enc ~ 0: about half of the 200 latents fire
            reconstructed, features, _ = ours(x)
            # dense path, features still a SparseCode (auto never changes the type)
            assert isinstance(features, SparseCode) and ours._density_gate.dense
            torch.testing.assert_close(reconstructed, ref(x)[0])
    # the first batch: a sparse encode found the code too wide, then the reference backend; the
    # second went to the reference backend directly (plus the reference model's own calls)
    assert len(calls) == 2 + 2
    assert sum("dense path" in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        for sae in (ref, ours):
            sae.b_enc.fill_(-2.5)
    assert ours._density_gate.dense
    ours(x)  # the first narrow batch still runs dense, and measures: only the dense path clears the gate
    assert not ours._density_gate.dense
    reconstructed, features, _ = ours(x)
    assert isinstance(features, SparseCode)
    torch.testing.assert_close(reconstructed, ref(x)[0])


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_auto_topk_wider_than_the_threshold_runs_dense(monkeypatch):
    """A TopK code wider than the threshold (k > it) goes to the reference backend; same step."""
    monkeypatch.setattr(dispatch, "_logged", set())
    ref, ours, batch = make_pair(48, 200, "topk", "none", False, torch.float64, k=50)
    ours.backend = "auto"
    ours._density_gate.threshold = 40
    x = batch(16)
    reconstructed, features, _ = ours(x)
    assert isinstance(features, SparseCode) and features.indices.shape == (16, 50)
    assert ours._density_gate.dense
    torch.testing.assert_close(reconstructed, ref(x)[0])
    ours._density_gate.threshold = 64  # wide enough: the next batch measures 50 and goes sparse again
    ours(x)
    assert not ours._density_gate.dense


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_triton_backend_model(monkeypatch, activation):
    """The model on backend triton (kernels interpreted on CPU, compiled on CUDA) matches the reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dispatch.triton_ops() is None:
        pytest.skip("saetron.kernels.triton_ops does not import here")
    from saetron.kernels.triton_common import interpreting

    if device == "cpu" and not interpreting():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: cannot interpret on CPU")
    k = 8 if activation == "topk" else None
    ref, _, batch = make_pair(40, 96, activation, "expected_average_only_in", True, torch.float32, k=k,
                              b_enc=-2.0)
    ours = SparseAutoencoder(40, 96, "expected_average_only_in", True, activation=activation, k=k,
                             backend="triton")
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.to(device), ours.to(device)
    x = batch(16).to(device)
    # fp32 on both sides, other summation orders (the kernels' tiles): 1e-4 of the largest entry
    outputs = []
    for sae in (ref, ours):
        reconstructed, features, loss_dict = sae(x)
        loss_dict["loss"].backward()
        outputs.append((reconstructed.detach(), features, loss_dict))
    (rec_ref, f_ref, _), (rec, f, _) = outputs
    assert isinstance(f, SparseCode)
    scale = f_ref.abs().max().item()
    torch.testing.assert_close(f.to_dense(96).detach(), f_ref.detach(), rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(rec, rec_ref, rtol=0, atol=1e-4 * rec_ref.abs().max().item())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g_ref, g = getattr(ref, name).grad, getattr(ours, name).grad
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-4 * (g_ref.abs().max().item() or 1.0), msg=name)
