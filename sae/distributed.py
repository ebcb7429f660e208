"""Process group set-up (NCCL on GPU, gloo on CPU) and FSDP2 applied to the SAE in one function.

Under torchrun (RANK/WORLD_SIZE set) the ranks join the group torchrun describes. A plain
`python -m saetron.sae.train` makes a one-rank group from an in-memory store, so one process runs
exactly the same code (fully_shard, collectives, DCP) as N ranks.
"""

from __future__ import annotations

import logging
import os
import sys
import typing
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join (or, in one process, create) the default process group; one device per rank."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    else:
        rank, world_size = 0, 1
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(rank, world_size, device)


def shutdown_distributed(env: DistEnv, completed: bool) -> None:
    """Leave the process group, in order.

    `completed`: every rank reached the end of the run. Then a barrier first, so no rank tears its
    group down while a peer is still inside a collective (rank 0 writes the SAE after the last
    all-reduce while the others are already done), then the group is destroyed. After an error on
    this rank a peer may wait in a collective that never completes: no barrier, and a multi-rank group
    is left to the process exit (destroying an NCCL group there can block); a one-rank group (a run
    inside another Python process, as the tests do) is destroyed so that a next run can make its own.

    gloo's worker threads outlive this call: its `shutdown()` is a no-op and torch's DTensor caches
    keep the FSDP mesh, hence the group, alive. See `exit_process` for why the CLI then ends the
    process without interpreter finalization.
    """
    if not dist.is_initialized():
        return
    if completed and env.world_size > 1:
        dist.barrier()
    if completed or env.world_size == 1:
        dist.destroy_process_group()


def exit_process(code: int) -> typing.NoReturn:
    """End the process with `code` after flushing stdout, stderr and the log handlers, skipping the
    interpreter's finalization.

    Why: a gloo worker thread drops its reference to a finished collective (and to the tensors it
    reduced) only after the caller has been woken up. When the caller has already dropped its Python
    handle of such a tensor, that last C++ reference must take the GIL to free the Python object; if
    the main thread has reached interpreter finalization by then, CPython ends the worker thread with
    pthread_exit, whose forced unwind through a noexcept destructor is `std::terminate` ("terminate
    called without an active exception", SIGABRT, rc -6 under torchrun). A rank that exits right after
    its last all-reduce (every rank but 0, which still writes the SAE) hit this ~1 run in 10 on a busy
    CPU. Everything the run writes is closed before this call, so finalization has nothing left to do.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def shard_model(model: nn.Module, env: DistEnv, compute_dtype: torch.dtype) -> nn.Module:
    """FSDP2 over all ranks: every parameter sharded on dim 0 (W_dec by latents, so the decoder-norm
    ops stay local), gathered in `compute_dtype` for forward/backward, gradients reduced in float32
    into float32 master shards that Adam updates."""
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # One FSDP unit (the SAE is one layer): keep the gathered parameters from forward to backward
    # instead of gathering them twice; they are resharded after backward.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    # The sparse backends return features as views (a SparseCode's indices/values); the warning is
    # about in-place ops on outputs, which the trainer never does: silence it (it fires every step).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over all ranks; returns the tensor."""
    dist.all_reduce(tensor, op=op)
    return tensor
