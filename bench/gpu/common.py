"""Shared pieces of the GPU benchmark (bench/gpu/run.sh): the mode, shapes, timing, the training steps.

Every section runs in one of two modes:
    GPU      CUDA, bf16, the issue's six shapes, CUDA-event timing (median of steps after warm-up)
    dry run  CPU (the Triton kernels under TRITON_INTERPRET=1, set by run.sh), tiny shapes, one
             warm-up and two timed steps: checks every code path (tests/test_gpu_bench.py runs it)
The training step is the trainer's own (`saetron.sae.train.train_step`: forward, loss, backward,
clip_grad_norm_ with the decoder-parallel projection, NaN check, SAEAdam step with renormalization),
so the benchmark times what training does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# (d, d_sae, k, B), bf16: the table; the first is the seed's SAE (DeepSeek-V3 width x8).
SHAPES = [(7168, 57344, 64, 8192), (2304, 65536, 64, 8192), (4096, 32768, 32, 8192),
          (4096, 16384, 64, 4096), (4096, 65536, 64, 4096), (4096, 262144, 64, 4096)]
# Dry run: d and d_sae off the kernels' block sizes, small enough for the Triton interpreter (its
# encode costs ~1 s a step at this size, ~60 s at d_sae=384, B=96).
DRY_SHAPES = [(40, 96, 4, 24)]
LR = 1e-4


def parse(description: str, argv: list[str] | None = None, **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: check the code paths")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "out" / "gpu"),
                        help="folder for the JSON results ($OUT when set)")
    for flag, kw in extra.items():
        parser.add_argument(flag, **kw)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the code paths on CPU")
    return args


def device(dry_run: bool) -> torch.device:
    return torch.device("cpu" if dry_run else "cuda")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls of fn after `warmup` calls: CUDA events on a GPU (each call
    bracketed by events, then one synchronization per call), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def write_json(out: str, name: str, payload) -> Path:
    path = Path(out) / name
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def environment() -> dict:
    """Device, versions and commit, recorded beside every result."""
    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    else:
        env["device"] = "cpu"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        env["commit"] = "unknown"
    return env


def format_kernel_row(r: dict) -> str:
    """One line of the kernels section (bench/gpu/kernels.py's rows)."""
    pred = f"{r['predicted_ms']:.2f}" if r.get("predicted_ms") else "-"
    floor = f"{r['floor_ms']:.2f}" if r.get("floor_ms") else "-"
    cfg = f" {r['config']}" if r.get("config") else ""
    check = f" rel_err {r['rel_err']:.1e}" if "rel_err" in r else ""
    return (f"{r['kernel']:<18} {r['ms']:8.3f} ms  predicted {pred:>5}  HBM floor {floor:>5}  "
            f"{r['hbm_gbs']:7.0f} GB/s HBM  {r['gather_gbs']:7.0f} GB/s gathered{cfg}{check}")


# -- the training steps of the providers ---------------------------------------------------------


def saetron_step(d: int, d_sae: int, k: int, x: torch.Tensor, backend: str, dtype: torch.dtype):
    """The trainer's step on a SparseAutoencoder(backend) with parameters in `dtype`: () -> l0."""
    from saetron.sae import SparseAutoencoder
    from saetron.sae.optim import SAEAdam
    from saetron.sae.train import train_step
    from saetron.sae.train_config import TrainConfig

    torch.manual_seed(0)
    sae = SparseAutoencoder(d, d_sae, "none", activation="topk", k=k, backend=backend, device=x.device,
                            dtype=dtype)
    opt = SAEAdam(sae, lr=LR)
    # max_grad_norm 1.0, the trainer's default: clipping is on
    cfg = TrainConfig(data_dir="-", output_dir="-", d_sae=d_sae, activation="topk", k=k,
                      batch_size=x.shape[0], lr=LR, backend=backend)

    def step():
        return train_step(sae, opt, x, cfg, 1, LR)[3]["l0"]  # (loss, reconstructed, features, loss_dict)

    return step


def sparse_coder_modules():
    """(sparsify.sparse_coder, sparsify.config) without running sparsify/__init__ (which imports its
    trainer and `datasets`), or None when sparsify is not importable here."""
    if "sparsify" not in sys.modules:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            return None
        pkg = types.ModuleType("sparsify")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
    return importlib.import_module("sparsify.sparse_coder"), importlib.import_module("sparsify.config")


def sparsify_step(d: int, d_sae: int, k: int, x: torch.Tensor, dtype: torch.dtype):
    """EleutherAI sparsify's SparseCoder (its Triton decoder on CUDA) through its trainer's step:
    forward, fvu.backward(), decoder-parallel gradient removal, Adam, unit-norm decoder."""
    modules = sparse_coder_modules()
    if modules is None:
        raise ModuleNotFoundError("sparsify is not importable (bash bench/gpu/fetch_wheels.sh, carry .whl)")
    sc, cfgmod = modules
    torch.manual_seed(0)
    sae = sc.SparseCoder(d, cfgmod.SparseCoderConfig(num_latents=d_sae, k=k), device=x.device, dtype=dtype)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=x.device.type == "cuda")

    def step():
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        return (out.latent_acts > 0).sum(-1).float().mean()

    return step


def gemm_step(d: int, d_sae: int, x: torch.Tensor):
    """The step's one unavoidable GEMM, x @ W_enc, by cuBLAS."""
    W = torch.randn(d, d_sae, device=x.device, dtype=x.dtype) / d**0.5
    return lambda: (x @ W, float("nan"))[1]
