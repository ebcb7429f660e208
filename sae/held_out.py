"""The trainer's held-out slice (--eval_tokens): which shards of a store training never reads, and their
evaluation once the SAE is exported.

The slice. Of the chosen shards (--num_shards, else all) S_0..S_{n-1}, the last m whole shards
S_{n-m}..S_{n-1} are held out, m the fewest whose tokens reach the wanted count N: --eval_tokens N, or by
default N = min(5% of the chosen tokens, 2^20), taken only when those m shards hold at most a quarter of
the chosen tokens (a store of a few big shards then keeps them all for training, and the log says so).
Training reads shards S_0..S_{n-m-1} only, so its planned steps, resume identity (their token count) and
shuffle are those of that shorter store; the slice is a pure function of the store and the flags, so a
resume holds out the same shards. Whole shards, because a shard ends at a batch end (no context window
spans two) and `python -m saetron.eval --first_shard n-m` reads exactly the same rows.

Training from the model (--model, sae/live.py) holds out the start of the text instead: the first forward
batches of each rank's text holding at least ceil(N / W) rows, N = --eval_tokens or by default
min(5% of the planned tokens, 2^16) (`live_eval_tokens`); training's stream starts after them, and rank
0 evaluates its own held rows once the SAE is exported (before the group's shutdown).

The evaluation (rank 0, after training and the export, once the process group is gone): the exported SAE
over every row of the slice, with saetron.eval's definitions (`evaluate`: pooled explained variance, over
all rows and over rows under 10x the slice's median norm, per-token FVU quantiles, L0, dead fraction over
the slice); written to `eval.json` in --output_dir, and printed in the trainer's final line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from saetron.collect.store import ActivationStore

from .train_config import TrainConfig

logger = logging.getLogger(__name__)

SHARE = 0.05  # the default slice: this share of the chosen tokens ...
CAP = 1 << 20  # ... at most this many tokens ...
MAX_SHARE = 0.25  # ... taken only when its whole shards hold at most this share
LIVE_CAP = 1 << 16  # --model's default: 5% of the planned tokens, at most this many rows (held in memory)
EVAL_JSON = "eval.json"
ROWS_PER_FORWARD = 4096  # rows of the slice per SAE forward


def held_out_count(cfg: TrainConfig, store: ActivationStore) -> tuple[int, str]:
    """(m, the number of last shards of `store` (cfg's chosen shards) held out, 0 for none; why none, or
    "") (module docstring)."""
    tokens = [shard.tokens for shard in store.shards]
    total = sum(tokens)
    auto = cfg.eval_tokens is None
    want = min(math.ceil(SHARE * total), CAP) if auto else cfg.eval_tokens
    if want == 0:
        return 0, "no held-out slice (--eval_tokens 0)"
    count = got = 0
    while got < want and count < len(tokens):
        count += 1
        got += tokens[-count]
    if count == len(tokens):
        if auto:
            return 0, (f"no held-out slice: the store's last shard alone holds {tokens[-1]} of its {total} "
                       "tokens; collect more shards (a smaller --shard_tokens) or pass --eval_tokens N")
        raise ValueError(f"--eval_tokens {want}: the last whole shards holding that many tokens are all "
                         f"{len(tokens)} chosen shards ({total} tokens), leaving none to train on; pass a "
                         f"smaller --eval_tokens (the last shard holds {tokens[-1]}), collect more shards, "
                         "or --eval_tokens 0 for no held-out slice")
    if auto and got > MAX_SHARE * total:
        return 0, (f"no held-out slice: the default ({want} tokens, 5% of {total}) would take the last "
                   f"{count} shard(s), {got} tokens, over a quarter of the store; pass --eval_tokens N to "
                   "hold out shards anyway")
    return count, ""


def live_eval_tokens(cfg: TrainConfig) -> int:
    """--model: the rows held out from the start of the text, all ranks together: --eval_tokens, or by
    default min(5% of the planned tokens (--max_steps x --batch_size), 2^16)."""
    if cfg.eval_tokens is not None:
        return cfg.eval_tokens
    return min(math.ceil(SHARE * cfg.max_steps * cfg.batch_size), LIVE_CAP)


def split_store(cfg: TrainConfig,
                store: ActivationStore) -> tuple[ActivationStore, ActivationStore | None, str]:
    """cfg's chosen shards -> (the training shards, the held-out shards or None, a note for the log)."""
    count, why = held_out_count(cfg, store)
    if count == 0:
        return store, None, why
    first = store.first_shard + len(store.shards) - count
    training = ActivationStore(store.folder, first - store.first_shard, first_shard=store.first_shard)
    held = ActivationStore(store.folder, count, first_shard=first)
    return training, held, (f"held out from training: shards {first}..{first + count - 1} "
                            f"({held.total_tokens} tokens of {store.total_tokens}), evaluated at the end")


def eval_device() -> torch.device:
    """This process's GPU (LOCAL_RANK's under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def evaluate_held_out(out_dir: str | Path, held: ActivationStore, backend: str = "auto") -> dict:
    """The exported SAE in out_dir over every row of `held`: saetron.eval's figures, also written to
    out_dir/eval.json (with the slice's shards and the definitions). An eval.json newer than the SAE, of
    the same shards, is read instead."""
    from saetron.eval.store import shard_range, store_batches

    from .model import SparseAutoencoder

    out_dir = Path(out_dir)
    where = {"what": f"shards {shard_range(held)}", "data_dir": str(held.folder),
             "first_shard": held.first_shard, "shards": held.shard_files}
    earlier = read_eval_json(out_dir)
    if earlier is not None and earlier.get("held_out") == where:
        return earlier
    sae = SparseAutoencoder.load(out_dir, device=eval_device(), backend=backend)
    return evaluate_rows(out_dir, sae, store_batches(held, ROWS_PER_FORWARD), where)


def evaluate_rows(out_dir: Path, sae, batches, where: dict) -> dict:
    """saetron.eval's figures of `sae` over `batches()` (rows [n, d_in]), with `where` (what the rows are)
    and the definitions, written to out_dir/eval.json."""
    from saetron.eval.run import DEFINITIONS, evaluate

    result = {**evaluate(sae, batches), "held_out": where, "sae": str(out_dir), "definitions": DEFINITIONS}
    (Path(out_dir) / EVAL_JSON).write_text(json.dumps(result, indent=1) + "\n")
    return result


def read_eval_json(out_dir: str | Path) -> dict | None:
    """out_dir/eval.json when it is newer than the SAE it evaluated, else None."""
    path = Path(out_dir) / EVAL_JSON
    try:
        if path.stat().st_mtime >= (Path(out_dir) / "sae.safetensors").stat().st_mtime:
            return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    return None


def final_line(last: dict, held: dict | None, out_dir: str) -> str:
    """The trainer's last log line: the held-out slice's figures (`held`, evaluate_held_out's) or, without
    a slice, the last metrics window of training (`last`)."""
    if held is not None:
        return (f"final | held out: {held['held_out']['what']}, {held['tokens']:,} tokens | "
                f"explained variance {held['explained_variance']:.4f} | normal rows "
                f"{held['explained_variance_typical']:.4f} | median fvu "
                f"{held['fvu_per_token_quantiles']['0.5']:.4f} | l0 {held['l0']:.1f} | dead "
                f"{100 * held['dead_fraction']:.2f}% | outputs in {out_dir}")
    return (f"final | training batches (no held-out slice) | explained variance "
            f"{last['explained_variance']:.4f} | normal rows "
            f"{last.get('explained_variance_normal', math.nan):.4f} | median fvu "
            f"{last.get('median_fvu', math.nan):.4f} | l0 {last['l0']:.1f} | dead "
            f"{100 * last['dead_fraction']:.2f}% | outputs in {out_dir}")
