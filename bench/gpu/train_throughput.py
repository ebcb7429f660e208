"""The trainer's tokens/s at the seed's shape, from a synthetic activation store on the local disk.

    python bench/gpu/train_throughput.py [--dry-run] [--out DIR] [--work DIR]   (run.sh: section `train`)

1. Writes a store in the collector's format (saetron.collect.store: manifest.json + safetensors
   shards) of SHARDS x SHARD_TOKENS random bf16 rows (N(0, 1) + a fixed offset) at d=7168.
2. Runs `python -m saetron.sae.train` on it: one process (FSDP2 over one GPU, fp32 master weights,
   bf16 compute, SAEAdam), d_sae=57344, TopK k=64, batch 8192, a metrics record every LOG_EVERY steps.
3. Stops that process (SIGTERM to the pid it started) once RECORDS records are in metrics.jsonl, so
   the final checkpoint and exports (~20 GB of writes at this size) stay out of the section's time.
Reports the trainer's own tokens/s (metrics.jsonl) of the records after the first one, whose interval
holds the kernels' compilation and warm-up. Writes train.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import common
import torch

GPU = {"d": 7168, "d_sae": 57344, "k": 64, "batch": 8192, "shards": 4, "shard_tokens": 40960, "log_every": 10}
DRY = {"d": 32, "d_sae": 128, "k": 4, "batch": 64, "shards": 3, "shard_tokens": 256, "log_every": 2}
RECORDS = 3
DEADLINE_S = 240  # the trainer's own start-up (store statistics, compilation) included


def write_store(folder: Path, d: int, shards: int, shard_tokens: int, device: torch.device) -> Path:
    """Random bf16 activations in the collector's store format (what `saetron-collect` writes)."""
    from saetron.collect import store

    folder.mkdir(parents=True, exist_ok=True)
    manifest = store.new_manifest(
        model="synthetic/random", revision="none", target_layer=0, hook_point="resid_post", d_model=d,
        dtype=torch.bfloat16, context_size=1024, keep_special_tokens=True, dataset="synthetic", split="train",
        text_field=None, tokenizer="none")
    gen = torch.Generator(device=device).manual_seed(0)
    offset = torch.randn(d, device=device, generator=gen)
    for i in range(shards):
        rows = (torch.randn(shard_tokens, d, device=device, generator=gen) + offset).to(torch.bfloat16).cpu()
        positions = torch.arange(shard_tokens, dtype=torch.int32) % 1024
        token_ids = torch.zeros(shard_tokens, dtype=torch.int32)
        store.write_shard(folder, manifest, rows, token_ids, positions, store.row_norms(rows),
                          stream_state={"shard": i})
    return folder


def run_trainer(store_dir: Path, run_dir: Path, cfg: dict, log: Path) -> tuple[list[dict], int | None]:
    """Start the trainer, wait for RECORDS metrics records (or its exit), stop it; (records, exit code)."""
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "saetron.sae.train", "--data_dir", str(store_dir),
           "--output_dir", str(run_dir), "--d_sae", str(cfg["d_sae"]), "--activation", "topk",
           "--k", str(cfg["k"]), "--batch_size", str(cfg["batch"]), "--epochs", "3",
           "--max_steps", str((RECORDS + 1) * cfg["log_every"]), "--log_every", str(cfg["log_every"]),
           "--stats_tokens", str(4 * cfg["batch"]), "--lr", "2e-4"]
    print(" ".join(cmd), flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=common.REPO)
        deadline, records = time.monotonic() + DEADLINE_S, []
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists():
                records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                if len(records) >= RECORDS:
                    break
            time.sleep(0.5)
        code = proc.poll()
        if code is None:  # still running: it has written what we wait for (or ran out of time)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return records[:RECORDS], code


def main(argv: list[str] | None = None) -> dict:
    args = common.parse(__doc__.splitlines()[0], argv,
                        **{"--work": {"default": os.environ.get("BENCH_WORK", "/tmp/saetron_bench"),
                                      "help": "folder for the store, the run and its log (not $OUT)"}})
    dev = common.device(args.dry_run)
    cfg = DRY if args.dry_run else GPU
    work = Path(args.work)
    t0 = time.perf_counter()
    store_dir = write_store(work / "store", cfg["d"], cfg["shards"], cfg["shard_tokens"], dev)
    store_s = time.perf_counter() - t0
    run_dir = work / f"run_{int(time.time())}"
    records, code = run_trainer(store_dir, run_dir, cfg, work / "train.log")
    steady = [r["tokens_per_s"] for r in records[1:]]
    result = {"env": common.environment(), "config": cfg, "store_write_s": store_s,
              "records": records, "exit_code": code,
              "tokens_per_s": sum(steady) / len(steady) if steady else None}
    common.write_json(args.out, "train.json", result)
    tail = (work / "train.log").read_text().splitlines()[-8:]
    print("\n".join(tail))
    if result["tokens_per_s"] is None:
        print(f"== trainer: no steady-state record (exit code {code}); log {work / 'train.log'}", flush=True)
        sys.exit(1)
    print(f"== trainer: {result['tokens_per_s']:,.0f} tokens/s at d={cfg['d']} d_sae={cfg['d_sae']} "
          f"k={cfg['k']} batch {cfg['batch']} (records {[r['step'] for r in records]}; store written in "
          f"{store_s:.1f} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
