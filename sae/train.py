"""The SAE trainer: reads an activation store, trains under FSDP2, writes checkpoints, metrics, the SAE.

    torchrun --nproc_per_node=8 -m saetron.sae.train --data_dir runs/big/activations \
        --output_dir runs/big/sae --d_sae 57344 --activation topk --k 64 --batch_size 32768 --lr 2e-4
    python -m saetron.sae.train --data_dir runs/pilot/activations --output_dir runs/pilot/tiny \
        --d_sae 1024 --activation topk --k 16 --batch_size 512 --max_steps 20    # tiny, one CPU process

One process and N ranks run the same code: a one-rank process group is made when torchrun did not
start us. Each step: forward, loss (with the L1 warm-up), backward, decoder-gradient projection,
global gradient clipping, a NaN/Inf check (before the optimizer touches the weights), Adam, decoder
renormalization. Outputs in --output_dir: metrics.jsonl, checkpoints/, train_config.json,
sae.safetensors + sae_config.json, saelens/ (cfg.json, sae_weights.safetensors, sparsity.safetensors).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import types
import typing
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoint import complete_checkpoints, find_checkpoint, load_checkpoint, save_checkpoint
from .config import SAEConfig
from .data import ActivationStore, BatchLoader, ShuffleOrder, check_batch_size, stats_batches
from .distributed import DistEnv, init_distributed, shard_model, shutdown_distributed
from .metrics import Metrics, MetricsFile, format_line
from .model import SparseAutoencoder
from .optim import SAEAdam
from .sparsity_control import L0Controller
from .train_config import TrainConfig, field_docs

logger = logging.getLogger(__name__)

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
    if not math.isfinite(grad_norm.item()) or not math.isfinite(loss.item()):
        raise RuntimeError(
            f"step {step}: loss {loss.item()} / gradient norm {grad_norm.item()} is not finite; stopped "
            "before the optimizer step (the last checkpoint is intact). Lower --lr, raise --lr_warmup_steps "
            "or check the activations for outliers, then --resume latest")
    optimizer.step()  # W_dec: decoder-parallel projection, Adam, renormalization (sae/optim.py)
    if controller is not None:
        controller.update(loss_dict["l0"], lr, integrate=not warming)
    return loss, reconstructed, features, loss_dict


def train(cfg: TrainConfig, env: DistEnv) -> dict:
    """Run the whole training described by cfg on this rank; returns the last metrics (rank 0's view)."""
    out_dir = prepare_output_dir(Path(cfg.output_dir), env)
    store = ActivationStore(cfg.data_dir, cfg.num_shards, cfg.target_layer, cfg.d_model)
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    cfg = replace(cfg, target_layer=store.manifest["target_layer"], d_model=store.d_model,
                  dtype=str(compute_dtype).removeprefix("torch."))
    if cfg.activation == "jumprelu" and cfg.k is None and cfg.target_l0 is not None:
        cfg = replace(cfg, k=max(1, round(cfg.target_l0)))  # the thresholds start at the target
    sae_cfg = SAEConfig(store.d_model, cfg.d_sae, cfg.normalize_activations, cfg.apply_b_dec_to_input,
                        cfg.l1_coeff, cfg.activation, cfg.k, aux_k_coeff=cfg.aux_k_coeff,
                        dead_window=cfg.dead_window, l0_coeff=cfg.l0_coeff,
                        jumprelu_bandwidth=cfg.jumprelu_bandwidth,
                        jumprelu_start_batches=cfg.jumprelu_start_batches,
                        jumprelu_ste_to_input=cfg.jumprelu_ste_to_input)
    order = ShuffleOrder(store.starts, cfg.shuffle_buffer, cfg.seed)
    batches_per_epoch = check_batch_size(store.total_tokens, cfg.batch_size, env.world_size)
    total_steps = min(cfg.epochs * batches_per_epoch, cfg.max_steps or math.inf)
    ckpt = find_checkpoint(out_dir / "checkpoints", cfg.resume) if cfg.resume else None
    earlier = complete_checkpoints(out_dir / "checkpoints")
    if earlier and not cfg.resume:  # a fresh run here would mix its checkpoints with the earlier run's
        raise ValueError(f"--output_dir {str(out_dir)!r} holds checkpoints of an earlier run (up to "
                         f"{earlier[-1].name}); pass --resume to continue it, or choose a new --output_dir")
    if env.is_main:
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        logger.info("store %s: %d tokens in %d shards, d_model %d | %d ranks, %d steps of %d tokens | %s",
                    cfg.data_dir, store.total_tokens, len(store.shards), store.d_model, env.world_size,
                    total_steps, cfg.batch_size, f"resuming from {ckpt}" if ckpt else "fresh start")

    torch.manual_seed(cfg.seed)  # the same initialization on every rank, before sharding
    model = SparseAutoencoder.from_config(sae_cfg, backend=cfg.backend)
    if sae_cfg.normalize_activations == "expected_average_only_in" and ckpt is None:
        model.estimate_activation_mean(stats_batches(store, order, cfg.stats_tokens))
    shard_model(model.to(env.device), env, compute_dtype)
    optimizer = SAEAdam(model, lr=cfg.lr)
    metrics = Metrics(cfg.d_sae, store.d_model, cfg.batch_size, model.architecture.dead_latents,
                      max(0, total_steps - math.ceil(cfg.dead_window / cfg.batch_size)), env.device)
    controller = None
    if cfg.target_l0 is not None:
        controller = L0Controller(cfg.target_l0, model.architecture.target_l0_gain, env.device)

    start_step = 0
    if ckpt is not None:
        start_step = resume(ckpt, cfg, store, model, optimizer, metrics, controller, total_steps)
    metrics_file = MetricsFile(out_dir / "metrics.jsonl", fresh=ckpt is None) if env.is_main else None
    run = start_wandb(cfg) if cfg.wandb and env.is_main else None

    loader = BatchLoader(store, order, cfg.batch_size, env.rank, env.world_size, start_step, total_steps,
                         env.device, cfg.prefetch)
    bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not env.is_main or not sys.stderr.isatty())
    last, t0 = {}, time.perf_counter()
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        for step, x in enumerate(loader, start=start_step):
            lr = lr_at(cfg, step, total_steps)
            loss, reconstructed, features, loss_dict = train_step(model, optimizer, x, cfg, step, lr,
                                                                  controller)
            metrics.update(step, loss, loss_dict, x, reconstructed, features)
            done = step + 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == total_steps:
                last = metrics.compute(done, lr, time.perf_counter() - t0)
                if controller is not None:
                    last["sparsity_coeff"] = sparsity_coeff(cfg) * float(controller.multiplier())
                if env.is_main:
                    metrics_file.write(last)
                    logger.info(format_line(last))
                    if run is not None:
                        run.log(last, step=done)
                t0 = time.perf_counter()
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total_steps:
                state = train_state(done, cfg, store, metrics, controller)
                save_checkpoint(out_dir / "checkpoints", done, model, optimizer, state, cfg.keep_checkpoints,
                                env.is_main)
    bar.close()
    if start_step == total_steps and env.is_main:
        logger.info("the checkpoint is at the last step (%d) already: exporting only", total_steps)
        last = metrics_file.last()
    export(model, sae_cfg, cfg, store, metrics, total_steps, out_dir, env)
    if env.is_main and last:
        logger.info("final | explained variance %.4f | l0 %.1f | dead %.2f%% | outputs in %s",
                    last["explained_variance"], last["l0"], 100 * last["dead_fraction"], out_dir)
    if run is not None:
        run.finish()
    return last


def train_state(step: int, cfg: TrainConfig, store: ActivationStore, metrics: Metrics,
                controller: L0Controller | None) -> dict:
    """What a checkpoint holds beside model and optimizer: the step (which fixes the data position,
    see data.py), what it must match on resume, the dead-latent/density counters, the RNG, the
    --target_l0 controller's state."""
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    return {"step": step, "settings": json.dumps(settings, sort_keys=True),
            "total_tokens": store.total_tokens, "rng_cpu": torch.get_rng_state(), **metrics.state_dict(),
            **(controller.state_dict() if controller is not None else {})}


def sparsity_coeff(cfg: TrainConfig) -> float:
    """The configured coefficient of the sparsity term in the loss (the controller's starting point)."""
    return cfg.l0_coeff if cfg.activation == "jumprelu" else cfg.l1_coeff


def resume(ckpt: Path, cfg: TrainConfig, store: ActivationStore, model, optimizer, metrics: Metrics,
           controller: L0Controller | None, total_steps: int) -> int:
    """Load ckpt into model, optimizer, metrics and controller after checking it belongs to this run;
    returns its step."""
    state = load_checkpoint(ckpt, model, optimizer, train_state(0, cfg, store, metrics, controller))
    expected = train_state(0, cfg, store, metrics, controller)
    if (state["settings"], state["total_tokens"]) != (expected["settings"], expected["total_tokens"]):
        raise ValueError(f"--resume {ckpt}: the checkpoint's settings {state['settings']} over "
                         f"{state['total_tokens']} tokens differ from this run's {expected['settings']} over "
                         f"{store.total_tokens} tokens; resume with the same flags and data, or start a new "
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


def export(model, sae_cfg: SAEConfig, cfg: TrainConfig, store: ActivationStore, metrics: Metrics,
           total_steps: int, out_dir: Path, env: DistEnv) -> None:
    """Collective: gather the full SAE on rank 0 and write the native format and the SAELens export."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    log_density = metrics.log_density(total_steps)
    if not env.is_main:
        return
    sae = SparseAutoencoder.from_config(sae_cfg)
    sae.load_state_dict(full)
    sae.save(out_dir)
    m = store.manifest
    hook_name = f"blocks.{m['target_layer']}.hook_{m.get('hook_point', 'resid_post')}"  # TransformerLens name
    saelens_dir = sae.export_saelens(out_dir / "saelens", model_name=m.get("model", "unknown"),
                                     hook_name=hook_name)
    save_file({"sparsity": log_density}, Path(saelens_dir) / "sparsity.safetensors")


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
    """The command line -> TrainConfig: one flag per field, its docstring as help."""
    parser = argparse.ArgumentParser(prog="saetron-train", description=__doc__.split("\n")[0])
    docs, hints = field_docs(), typing.get_type_hints(TrainConfig)
    defaults = TrainConfig.__dataclass_fields__
    for name, hint in hints.items():
        kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
            if isinstance(hint, types.UnionType) else hint
        default = defaults[name].default
        required = default is defaults[name].default_factory  # both MISSING: no default
        kw = {"help": docs.get(name, ""), "required": required}
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


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    env = init_distributed()
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING, format="%(message)s")
    try:
        return train(cfg, env)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
