"""One TopK training step, side by side: saetron (auto, triton), the dense reference, sparsify, bare cuBLAS.

    python bench/gpu/step_table.py [--dry-run] [--out DIR]        (run.sh runs it as section `table`)

For each (d, d_sae, k, B) of common.SHAPES, in one process: one batch x ~ N(0, 1) in bf16 shared by
every provider, parameters in bf16, WARMUP steps, then the median of ITERS steps timed with CUDA
events (each step alone), and the peak memory each provider allocated (its model, optimizer state,
activations; the shared batch excluded). Providers:
    saetron_auto, saetron_triton   SparseAutoencoder(backend=...) through the trainer's step
                                   (train_step: clipping at max_grad_norm 1.0 and the fused SAEAdam)
    saetron_reference              the dense reference (what SAELens computes), same step
    sparsify                       EleutherAI sparsify 1.3's SparseCoder with its Triton decoder, its
                                   own step (no clipping), torch's fused Adam; skipped with a note
                                   when sparsify is not importable
    cublas_gemm                    x @ W_enc alone, the step's one unavoidable GEMM
Writes step_table.json; prints the markdown table of the issue.
"""

from __future__ import annotations

import gc
import time

import common
import torch

WARMUP, ITERS = 3, 8
PROVIDERS = ("cublas_gemm", "saetron_auto", "saetron_triton", "saetron_reference", "sparsify")


def build(provider: str, shape: tuple[int, int, int, int], x: torch.Tensor):
    d, d_sae, k, _ = shape
    if provider == "cublas_gemm":
        return common.gemm_step(d, d_sae, x)
    if provider == "sparsify":
        return common.sparsify_step(d, d_sae, k, x, x.dtype)
    return common.saetron_step(d, d_sae, k, x, provider.removeprefix("saetron_"), x.dtype)


def measure(provider: str, shape, x: torch.Tensor, dev: torch.device, warmup: int, iters: int) -> dict:
    d, d_sae, k, B = shape
    rec = {"provider": provider, "d": d, "d_sae": d_sae, "k": k, "B": B, "dtype": str(x.dtype)}
    t0 = time.perf_counter()
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        step = build(provider, shape, x)
        times = common.time_ms(step, dev, warmup, iters)
        ms = common.median(times)
        rec.update(step_ms=ms, min_ms=min(times), times_ms=times, tokens_per_s=B / (ms / 1e3),
                   l0=float(step()))
        if dev.type == "cuda":
            rec["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except ModuleNotFoundError as err:
        rec["skipped"] = str(err)
    except Exception as err:  # report and go on with the other providers
        rec["error"] = f"{type(err).__name__}: {err}"[:300]
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def table(records: list[dict]) -> str:
    lines = ["| shape (d, d_sae, k, B), bf16 | provider | ms/step | tokens/s | peak GiB |",
             "|---|---|---|---|---|"]
    for r in records:
        shape = f"{r['d']}, {r['d_sae']}, {r['k']}, {r['B']}"
        if "step_ms" in r:
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "n/a"
            lines.append(f"| {shape} | {r['provider']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} "
                         f"| {peak} |")
        else:
            lines.append(f"| {shape} | {r['provider']} | {r.get('skipped') or r.get('error')} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = common.parse(__doc__.splitlines()[0], argv)
    dev = common.device(args.dry_run)
    shapes = common.DRY_SHAPES if args.dry_run else common.SHAPES
    warmup, iters = (1, 1) if args.dry_run else (WARMUP, ITERS)
    records = []
    for shape in shapes:
        d, _, _, B = shape
        gen = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(B, d, device=dev, generator=gen).to(torch.bfloat16)  # [B, d], shared by all
        for provider in PROVIDERS:
            rec = measure(provider, shape, x, dev, warmup, iters)
            records.append(rec)
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items() if k != "times_ms"}
            print(shown, flush=True)
        del x
    common.write_json(args.out, "step_table.json", {"env": common.environment(), "warmup": warmup,
                                                    "iters": iters, "records": records})
    print("\n== step table (median of CUDA-event-timed steps; x ~ N(0, 1); saetron steps clip at "
          "max_grad_norm 1.0, sparsify's do not)\n" + table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
