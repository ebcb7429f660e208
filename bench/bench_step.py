"""Throughput of one SAE training step (forward, backward, Adam, decoder-norm): saetron vs its peers.

    .venv/bin/python -m pytest bench/bench_step.py                    # the table at the end
    .venv/bin/python -m pytest bench/bench_step.py --density-sweep    # + the dense/sparse crossover

d_in=576 (SmolLM2-135M), d_sae=4608 (8x), B=4096 tokens, fp32 on CPU (bf16 on GPU: not measured
here). Two workloads, each with its providers side by side in one process:
    topk   k=64:      ours (backend auto), the dense reference, SAELens TopKTrainingSAE, sparsify SparseCoder
    relu   L0 ~64:    ours (backend auto), the dense reference, SAELens StandardTrainingSAE
                      (b_enc = -3.1: Kaiming pre-activations have std ~1.4 on unit inputs, so ~1.4% fire)
Every provider starts from the same weights and sees the same batch. Each provider's step is what
its own trainer does per batch:
    ours, reference   the trainer's step (saetron.sae.train.train_step): model(x), loss.backward(), the
                      gradient norm of the decoder-projected gradients and clipping at 1.0, SAEAdam
                      (Adam; W_dec's projection and renormalization fused in)
    SAELens           SAETrainer.step(x): training_forward_pass, firing statistics, backward,
                      clip_grad_norm_, Adam, zero_grad, lr scheduler (its trainer keeps no unit-norm
                      decoder: TopK rescales by the norm, standard puts it into the L1 term)
    sparsify          SparseCoder(x) -> fvu.backward(); remove_gradient_parallel_to_decoder_directions();
                      Adam (its trainer's `adam` option); set_decoder_norm_to_unit_norm (which its trainer
                      runs only at start: kept here so that every provider does the same work)
tokens_per_s = B / seconds, from the best of ROUNDS rounds (other processes on a shared machine only
add time); the median is recorded too. Ratios (ours / peer) are in ours' extra_info, twice:
    ours/<peer>               from the providers' own benchmark runs (one after the other)
    ours/<peer> interleaved   from INTERLEAVED_ROUNDS more rounds that take one step of every
                              provider in turn, so that all see the same background load: the
                              figure to trust on a shared machine, where load changes by the minute
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch

from saetron.sae import SparseAutoencoder
from saetron.sae.optim import SAEAdam
from saetron.sae.train import train_step
from saetron.sae.train_config import TrainConfig

# sparsify imports its Triton decoder when triton is installed, which needs CUDA: on CPU use its
# eager decoder (F.embedding_bag), as its own switch allows.
if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

D_IN, D_SAE, BATCH, K = 576, 4608, 4096, 64
RELU_B_ENC = -3.1
ROUNDS = 5
INTERLEAVED_ROUNDS = 4
LR = 1e-4
RESULTS: dict[str, dict[str, dict]] = {}  # workload -> provider -> record; read by bench/conftest.py
STEPS: dict[str, dict[str, object]] = {}  # workload -> provider -> step, kept for the interleaved rounds
PEERS = {"topk": ("reference", "saelens", "sparsify"), "relu": ("reference", "saelens")}


def _commit() -> str:
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else "CPU"
    except OSError:
        model = "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def _source_sae(activation: str) -> SparseAutoencoder:
    """The weights every provider starts from (centering off: the peers have none)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(D_IN, D_SAE, "none", activation=activation, k=K if activation == "topk" else None)
    if activation == "relu":
        with torch.no_grad():
            sae.b_enc.fill_(RELU_B_ENC)
    return sae


def _batch() -> torch.Tensor:
    return torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))


# -- providers: each returns a zero-argument training step -----------------------------------------


def _saetron_step(sae: SparseAutoencoder):
    """One full training step of a saetron SAE on the shared batch -> (features, loss_dict): the
    trainer's own step (train_step: forward, backward, clipping of the decoder-projected gradients,
    SAEAdam with the renormalization)."""
    opt = SAEAdam(sae, lr=LR)
    cfg = TrainConfig(data_dir="-", output_dir="-", d_sae=D_SAE, activation=sae.cfg.activation, k=sae.cfg.k,
                      batch_size=BATCH, lr=LR)
    x = _batch()

    def step():
        _, _, features, loss_dict = train_step(sae, opt, x, cfg, 0, LR)
        return features, loss_dict

    return step


def _ours_step(activation: str, backend: str):
    src = _source_sae(activation)
    sae = SparseAutoencoder(D_IN, D_SAE, "none", activation=activation, k=src.cfg.k, backend=backend)
    sae.load_state_dict(src.state_dict())
    step = _saetron_step(sae)
    return lambda: step()[1]["l0"]


def _saelens_step(activation: str):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed (pip install '.[peers]')")
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    src = _source_sae(activation)
    if activation == "topk":
        cfg = sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float32", device="cpu")
        sae = sae_lens.TopKTrainingSAE(cfg)
    else:
        cfg = sae_lens.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu")
        sae = sae_lens.StandardTrainingSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(src, name))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=10**12, train_batch_size_samples=BATCH, lr=LR, lr_end=LR, device="cpu"
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    x = _batch()

    def step():
        out = trainer.step(x)
        return (out.feature_acts > 0).sum(-1).float().mean()

    return step


def _sparsify_step(activation: str):
    sparsify = pytest.importorskip("sparsify", reason="sparsify is not installed (pip install '.[peers]')")
    src = _source_sae(activation)
    sae = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K), device="cpu")
    with torch.no_grad():
        sae.encoder.weight.copy_(src.W_enc.t())
        sae.encoder.bias.copy_(src.b_enc)
        sae.W_dec.copy_(src.W_dec)
        sae.b_dec.copy_(src.b_dec)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    did_fire = torch.zeros(D_SAE, dtype=torch.bool)
    x = _batch()

    def step():
        out = sae(x)
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        return (out.latent_acts > 0).sum(-1).float().mean()

    return step


PROVIDERS = {
    "reference": lambda activation: _ours_step(activation, "reference"),
    "saelens": _saelens_step,
    "sparsify": _sparsify_step,
    "ours": lambda activation: _ours_step(activation, "auto"),
}


def _record(benchmark, workload: str, provider: str, step) -> dict:
    l0 = float(step())  # warm-up (first-call allocations, the density gate's first look)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    record = {
        "workload": workload,
        "provider": provider,
        "tokens_per_s": BATCH / stats.min,  # tokens_per_s = B / best step seconds
        "tokens_per_s_median": BATCH / stats.median,
        "step_ms": stats.min * 1e3,
        "l0": l0,
        "shape": f"d_in={D_IN} d_sae={D_SAE} B={BATCH}" + (f" k={K}" if workload == "topk" else ""),
        "dtype": "float32",
        "device": _device_name(),
        "commit": _commit(),
    }
    RESULTS.setdefault(workload, {})[provider] = record
    STEPS.setdefault(workload, {})[provider] = step
    return record


def _interleaved(workload: str) -> dict[str, float]:
    """Best step seconds of each provider over rounds that run one step of each in turn."""
    steps = STEPS[workload]
    best = {name: float("inf") for name in steps}
    for _ in range(INTERLEAVED_ROUNDS):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@pytest.mark.parametrize("workload, provider", [
    ("topk", "reference"), ("topk", "saelens"), ("topk", "sparsify"), ("topk", "ours"),
    ("relu", "reference"), ("relu", "saelens"), ("relu", "ours"),
])  # peers first: ours computes its ratios against the peers measured before it in this process
def test_train_step(benchmark, workload, provider):
    benchmark.group = f"train step, {workload}"
    step = PROVIDERS[provider](workload)
    record = _record(benchmark, workload, provider, step)
    if provider == "ours":
        best = _interleaved(workload)
        for name, seconds in best.items():  # tokens_per_s_interleaved = B / best interleaved step seconds
            RESULTS[workload][name]["tokens_per_s_interleaved"] = BATCH / seconds
        for peer in PEERS[workload]:
            if peer not in RESULTS[workload]:
                record[f"ours/{peer}"] = "not measured in this run (skipped or deselected)"
                continue
            record[f"ours/{peer}"] = record["tokens_per_s"] / RESULTS[workload][peer]["tokens_per_s"]
            record[f"ours/{peer} interleaved"] = best[peer] / best["ours"]
    benchmark.extra_info.update(record)


# -- the density threshold of saetron.kernels.dispatch ------------------------------------------------

# Pre-activations have std ~1.4: these b_enc give widths K (the largest per-token active count) of
# ~130, 400, 500, 630, 830 and 1090 at these sizes.
SWEEP_B_ENC = (-3.1, -2.2, -2.0, -1.8, -1.5, -1.2)
SWEEP_ROUNDS = 4


def _relu_step(backend: str, b_enc: float):
    torch.manual_seed(0)
    sae = SparseAutoencoder(D_IN, D_SAE, "none", activation="relu", backend=backend)
    with torch.no_grad():
        sae.b_enc.fill_(b_enc)
    step = _saetron_step(sae)
    return lambda: step()[0]


@pytest.mark.parametrize("b_enc", SWEEP_B_ENC)
def test_density_sweep(request, benchmark, b_enc):
    """ReLU step time vs the code's width K, sparse (torch) vs dense (reference), steps alternated so
    that both see the same background load: where they cross is DENSE_WIDTH_THRESHOLD."""
    if not request.config.getoption("--density-sweep"):
        pytest.skip("the density sweep runs with --density-sweep")
    sparse, dense = _relu_step("torch", b_enc), _relu_step("reference", b_enc)
    width = sparse().indices.shape[1]
    dense()
    best = {"sparse": float("inf"), "dense": float("inf")}
    for _ in range(SWEEP_ROUNDS):
        for name, step in (("sparse", sparse), ("dense", dense)):
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    benchmark.group = "density sweep (the sparse step)"
    benchmark.pedantic(sparse, rounds=1, iterations=1)
    record = dict(b_enc=b_enc, width=width, sparse_ms=best["sparse"] * 1e3, dense_ms=best["dense"] * 1e3,
                  sparse_over_dense=best["sparse"] / best["dense"], device=_device_name(), commit=_commit())
    benchmark.extra_info.update(record)
    RESULTS.setdefault("density", {})[b_enc] = record
