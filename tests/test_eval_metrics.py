"""Held-out reconstruction metrics equal a direct whole-array computation, on every backend and chunking."""

import numpy as np
import pytest
import torch
from eval_support import random_sae, write_rows_store

from saetron.collect import fp8
from saetron.eval.run import evaluate, evaluate_reconstruction, store_batches
from saetron.eval.store import open_store
from saetron.kernels.sparse_code import SparseCode

D_IN, D_SAE, K = 24, 64, 5
SHARDS = (70, 45, 33)  # uneven, so chunks straddle shard ends
OUTLIERS = (3, 80, 140)  # rows scaled 60x: beyond 10x the median norm, as attention-sink rows are


def make_rows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(SHARDS), D_IN, generator=g) + 2.0 * torch.randn(D_IN, generator=g)
    x[list(OUTLIERS)] *= 60.0
    return x


@pytest.fixture
def store(tmp_path):
    x = make_rows()
    return open_store(write_rows_store(tmp_path / "store", list(torch.split(x, SHARDS)))), x


def direct(sae, x: torch.Tensor) -> dict:
    """The figures from the whole array at once (one SAE forward), textbook forms in float64 numpy."""
    with torch.no_grad():
        x_hat, f, _ = sae(x)
    f = f.to_dense(D_SAE) if isinstance(f, SparseCode) else f
    X, R, F = x.double().numpy(), x_hat.double().numpy(), f.double().numpy()
    norms = np.linalg.norm(X, axis=1)
    typical = norms < 10 * np.median(norms)

    def ev(rows):
        Xs, Rs = X[rows], R[rows]
        return 1 - ((Xs - Rs) ** 2).sum() / ((Xs - Xs.mean(0)) ** 2).sum()

    cos = (X * R).sum(1) / (norms * np.linalg.norm(R, axis=1))
    fvu_tok = ((X - R) ** 2).sum(1) / ((X - X.mean(0)) ** 2).sum(1)
    counts = (F != 0).sum(0)
    return {"explained_variance": ev(slice(None)), "explained_variance_typical": ev(typical),
            "typical_tokens": int(typical.sum()), "mse": ((X - R) ** 2).sum(1).mean(), "cossim": cos.mean(),
            "relative_reconstruction_bias": (R ** 2).sum() / (X * R).sum(), "l0": (F != 0).sum(1).mean(),
            "dead_fraction": (counts == 0).mean(), "fvu_median": np.median(fvu_tok), "counts": counts,
            "max": F.max(0), "F": F}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("chunk", [17, 1000])
def test_metrics_equal_a_direct_computation(store, backend, chunk):
    store, x = store
    sae = random_sae(D_IN, D_SAE, K, seed=1, backend=backend)
    m, stats = evaluate_reconstruction(sae, store_batches(store, chunk, None), top_k=4)
    want = direct(sae, x)
    assert m["tokens"] == sum(SHARDS) and want["typical_tokens"] == sum(SHARDS) - len(OUTLIERS)
    # reference: the same float32 reconstructions summed in float64 in two orders agree to ~1e-12
    # relative, so 1e-9. torch: its float32 GEMM may round a row differently at another batch size
    # (the BLAS picks its blocking by shape): ~1e-7 relative on a figure, so 1e-6. Both are far below
    # any wrong term (the outlier rows alone move EV by > 1e-2).
    rel = 1e-9 if backend == "reference" else 1e-6
    for key in ("explained_variance", "explained_variance_typical", "mse", "cossim",
                "relative_reconstruction_bias", "l0", "dead_fraction", "typical_tokens"):
        assert m[key] == pytest.approx(want[key], rel=rel, abs=1e-12), key
    assert m["fvu"] == pytest.approx(1 - want["explained_variance"], rel=rel)
    assert abs(m["explained_variance"] - m["explained_variance_typical"]) > 1e-2  # the cut matters here
    assert m["fvu_per_token_quantiles"]["0.5"] == pytest.approx(want["fvu_median"], rel=1e-5)  # float32 kept
    assert sum(m["l0_histogram"]) == m["tokens"] and len(m["l0_histogram"]) == K + 1
    assert np.array_equal(stats.counts.numpy(), want["counts"])
    np.testing.assert_allclose(stats.max_activation.numpy(), want["max"], rtol=1e-5)  # float32, see above
    for j in range(D_SAE):  # the top rows: largest activation first, the earlier row on a tie
        col = want["F"][:, j]
        order = [int(i) for i in np.lexsort((np.arange(len(col)), -col)) if col[i] > 0][:4]
        assert [r for r, _ in stats.top_examples(j)] == order, j


def test_explained_variance_is_saelens(store):
    """The same figure as SAELens' own streaming calculator fed the same rows (in float64: SAELens sums
    each batch in its input dtype, so float32 batches would differ from our float64 sums by ~1e-7)."""
    evals = pytest.importorskip("sae_lens.evals")
    store, _ = store
    sae = random_sae(D_IN, D_SAE, K, seed=1, backend="reference")
    calc = evals.ExplainedVarianceCalculator()
    with torch.no_grad():
        for x in store_batches(store, 17, None)():
            calc.add_batch(sae(x)[0].double(), x.double())
    got = evaluate(sae, store_batches(store, 17, None))["explained_variance"]
    assert got == pytest.approx(calc.compute(), rel=1e-9)


def test_max_tokens_reads_the_first_rows(store):
    store, x = store
    sae = random_sae(D_IN, D_SAE, K, seed=1)
    m = evaluate(sae, store_batches(store, 16, 50))
    assert m["tokens"] == 50
    assert m["l0"] == pytest.approx(direct(sae, x[:50])["l0"])


def test_float8_store_is_read_decoded(tmp_path):
    """A float8 store's rows reach the SAE decoded with their per-row scales: the figures equal a direct
    computation on the rows encoded and decoded by fp8.py (the codes alone are rows / scale, ~448 at
    each row's largest element, and would give other figures)."""
    x = make_rows()
    store = open_store(write_rows_store(tmp_path / "fp8", list(torch.split(x, SHARDS)), dtype=fp8.FP8))
    codes, scales = torch.empty(x.shape, dtype=fp8.FP8), torch.empty(len(x))
    fp8.encode(x, codes, scales)
    decoded = fp8.decode(codes, scales)
    assert store.scaled and not torch.equal(decoded, x)  # the encoding is lossy: these are other rows
    sae = random_sae(D_IN, D_SAE, K, seed=1, backend="reference")
    m = evaluate(sae, store_batches(store, 17, None))
    want = direct(sae, decoded)
    for key in ("explained_variance", "explained_variance_typical", "mse", "l0", "dead_fraction"):
        assert m[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key  # as the reference case above
    rows = store.read(60, 80)  # a span across shards 0 and 1, decoded the same way
    assert (rows.shard, rows.start) == (0, 60) and torch.equal(rows.activations, decoded[60:80])


def test_package_exports_the_entry_points():
    """`from saetron.eval import evaluate` (the package's documented entry point) resolves to run.py's
    function; it must not recurse through the package's lazy __getattr__."""
    import subprocess
    import sys

    code = ("from saetron.eval import evaluate, format_summary\n"
            "import saetron.eval.run as run\n"
            "assert evaluate is run.evaluate and format_summary is run.format_summary\n")
    subprocess.run([sys.executable, "-c", code], check=True)  # a fresh process: run.py not yet imported
