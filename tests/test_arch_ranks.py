"""What the architectures learn from a training batch is the same on every rank: two gloo ranks with
different batches, against the same quantities computed in one process.

    dead latents    tokens_since_fired: the union of both ranks' firings, both batches' tokens counted
    batchtopk       threshold: the mean of the two ranks' smallest positive selections
    jumprelu        threshold_scale: likewise, over its start batches
    --target_l0     the controller's state: from the mean of the two ranks' L0 (relu)
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saetron.sae import SparseAutoencoder
from saetron.sae.losses import firing_counts
from saetron.sae.sparsity_control import L0Controller

B, D_IN, D_SAE = 8, 16, 40
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


def build(activation: str) -> SparseAutoencoder:
    torch.manual_seed(0)  # the same weights on every rank
    k = None if activation == "relu" else 3
    return SparseAutoencoder(D_IN, D_SAE, "none", activation=activation, k=k,
                             backend="torch", dead_window=32, jumprelu_start_batches=3)


def batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(B, D_IN, generator=g) for _ in range(3)]


def run(rank: int, world: int, activation: str) -> dict:
    """Three training forwards on rank `rank`'s batches; the state they leave."""
    sae = build(activation)
    controller = L0Controller(2.0, 10.0, torch.device("cpu"))
    for x in batches(rank):
        _, _, losses = sae(x)
        controller.update(losses["l0"], lr=1e-2)
    arch = sae.architecture
    state = {"since": arch.dead_latents.tokens_since_fired.clone(), "control": controller.state.clone()}
    if activation == "batchtopk":
        state["threshold"] = arch.threshold.clone()
    if activation == "jumprelu":
        state["scale"] = arch.threshold_scale.clone()
    return state


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({a: run(rank, world, a) for a in ACTIVATIONS}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def smallest_positive_selected(activation: str, rank: int) -> list[float]:
    """Per batch of rank `rank`, one process: the B*k-th largest pre-activation (positive here)."""
    sae, values = build(activation), []
    for x in batches(rank):
        with torch.no_grad():
            pre = x @ sae.W_enc + sae.b_enc
        values.append(float(torch.topk(pre.reshape(-1), B * 3).values[-1]))
        sae(x)  # the same weights as in the ranks (no optimizer step): only buffers move
    return values


def test_ranks_agree_on_what_they_learn(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(worker, args=(2, str(tmp_path / "pg"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for activation in ACTIVATIONS:
        a, b = ranks[0][activation], ranks[1][activation]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), activation
        # one process replays each rank's batches on its own copy (a rank's code does not depend on the
        # other's batches) and counts the union of their firings
        saes, since = [build(activation), build(activation)], torch.zeros(D_SAE, dtype=torch.int64)
        for step_batches in zip(batches(0), batches(1)):
            fired = [firing_counts(sae(x)[1], D_SAE) > 0 for sae, x in zip(saes, step_batches)]
            since = torch.where(fired[0] | fired[1], 0, since + 2 * B)
        assert torch.equal(a["since"], since), activation
        if activation != "relu":  # (ReLU at init fires every latent)
            assert bool((since >= 32).any()) and bool((since == 0).any())  # some dead, some firing
    mins = [smallest_positive_selected("batchtopk", r) for r in range(2)]
    means = [(m0 + m1) / 2 for m0, m1 in zip(*mins)]  # per step, over the ranks
    # fp32 buffers updated in fp64: 1e-6 relative
    assert float(ranks[0]["batchtopk"]["threshold"]) == pytest.approx(sum(means) / 3, rel=1e-6)
    jmins = [smallest_positive_selected("jumprelu", r) for r in range(2)]
    assert float(ranks[0]["jumprelu"]["scale"]) == pytest.approx((jmins[0][-1] + jmins[1][-1]) / 2, rel=1e-6)
    # the controller: from the mean L0 over the ranks (ReLU's differ from rank to rank)
    saes, expected = [build("relu"), build("relu")], L0Controller(2.0, 10.0, torch.device("cpu"))
    for step_batches in zip(batches(0), batches(1)):
        l0 = [sae(x)[2]["l0"] for sae, x in zip(saes, step_batches)]
        assert float(l0[0]) != float(l0[1])
        expected.update((l0[0] + l0[1]) / 2, lr=1e-2)
    torch.testing.assert_close(ranks[0]["relu"]["control"], expected.state)
