"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, pruned.

A checkpoint is a folder `checkpoints/step_00000120/` holding DCP's files (each rank writes its own
shards of the model and the optimizer state) plus `.metadata`, written last by DCP, and, when the data
source has per-rank state (live training: each rank's text stream position), `rank_00000.json`, ...
written by each rank before DCP's collective save, so that `.metadata` implies them. It is written as
`step_00000120.tmp/` and renamed only once complete, and older checkpoints are removed only after
that rename: a crash at any moment leaves the previous complete checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
# Test hook: SIGKILL this process right after the checkpoint of this step is complete (a crash mid-run).
CRASH_ENV = "SAETRON_TRAIN_CRASH_AFTER_STEP"


def rank_state_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rank_{rank:05d}.json"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root (renamed, with DCP's .metadata), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, keep: int, is_main: bool, rank_state: dict | None = None) -> Path:
    """Collective: write model, optimizer and train_state (tensors and ints) as checkpoint `step`;
    `rank_state` (JSON) is this rank's own state, read back by load_rank_state."""
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a crashed save of this step
    dist.barrier()
    if rank_state is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        rank_state_file(tmp, dist.get_rank()).write_text(json.dumps(rank_state))
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             "train": train_state}
    dcp.save(state, checkpoint_id=str(tmp))  # returns once every rank's part and .metadata are written
    if is_main:
        if final.exists():  # the same step saved again (a resumed run that stopped right here)
            old = root / f"{final.name}.old"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        for stale in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(stale)
        logger.info("checkpoint %s", final)
    dist.barrier()
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return final


def load_rank_state(path: Path, rank: int) -> dict | None:
    """This rank's state saved with checkpoint `path`, or None when it has none."""
    file = rank_state_file(path, rank)
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def find_checkpoint(root: Path, resume: str) -> Path | None:
    """The checkpoint `resume` names: `latest` (None when there is none yet) or a folder."""
    if resume == "latest":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / ".metadata").is_file():
        raise ValueError(f"--resume {resume!r}: expected a complete checkpoint folder (with .metadata), "
                         f"such as {root}/step_00000100; complete ones here: "
                         f"{[p.name for p in complete_checkpoints(root)] or 'none'}")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict) -> dict:
    """Collective: load `path` into model and optimizer (already sharded); returns the loaded train_state,
    whose keys and tensor shapes are those of the `train_state` template."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             "train": train_state}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return state["train"]
