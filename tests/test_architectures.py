"""The architecture registry and its seam: every hook of the interface through the one forward.

`Probe` below is a test-only architecture (not one saetron offers): its code is the batch's B*k largest
pre-activations (BatchTopK), an auxiliary loss decodes each token's 2 largest among a fixed set of
latents (a masked RowTopK on the same encode) against the residual, a buffer counts training batches,
and at inference it selects per token (RowTopK). Defined here without touching the forward or any
backend, it must train identically on every backend and save and load its own tensors.
"""

from __future__ import annotations

import pytest
import torch
from selection_support import ops_for

from saetron.kernels.selection import BatchTopK, RowTopK
from saetron.kernels.sparse_code import SparseCode
from saetron.sae import SAEConfig, SparseAutoencoder
from saetron.sae.architectures import ARCHITECTURES, Architecture, get_architecture, register
from saetron.sae.config import ACTIVATION_NAMES
from saetron.sae.optim import SAEAdam
from saetron.sae.train import train_step
from saetron.sae.train_config import TrainConfig


class Probe(Architecture):
    name = "probe"
    saelens_name = "standard"
    sparsity_in_loss = False

    def __init__(self, cfg, device=None, dtype=None):
        super().__init__(cfg)
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("candidates", torch.arange(cfg.d_sae, device=device) % 5 == 0)

    @classmethod
    def check_config(cls, cfg):
        if cfg.k is None:
            raise ValueError("probe needs k")

    def selection_rules(self):
        if self.training:
            return [BatchTopK(self.cfg.k), RowTopK(2, self.candidates)]
        return [RowTopK(self.cfg.k)]

    def dense_activation(self, pre):
        top = torch.topk(pre.reshape(-1), pre.shape[0] * self.cfg.k).indices
        return torch.zeros_like(pre).view(-1).scatter(0, top, pre.reshape(-1)[top].relu()).view_as(pre)

    def auxiliary_losses(self, inputs):
        if len(inputs.selections) < 2:  # inference: no auxiliary selection
            return {}
        aux = inputs.selections[1]
        code = SparseCode(aux.indices, torch.where(aux.valid, aux.pre.relu(), 0))
        residual = (inputs.enc_in - inputs.out).detach()
        return {"aux": (inputs.decode(code) - residual).pow(2).mean()}

    @torch.no_grad()
    def observe(self, selections, code):
        self.batches_seen += 1


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "probe", Probe)


def test_registry_names_every_architecture():
    names = ("batchtopk", "jumprelu", "relu", "topk")
    assert tuple(ARCHITECTURES) == ACTIVATION_NAMES == names
    assert [get_architecture(n).saelens_name for n in names] == ["jumprelu", "jumprelu", "standard", "topk"]
    assert [get_architecture(n).sparsity_in_loss for n in names] == [False, True, True, False]
    with pytest.raises(ValueError, match=r"unknown activation 'gated'; allowed: \('batchtopk', 'jumprelu', "
                                         r"'relu', 'topk'\)"):
        get_architecture("gated")
    with pytest.raises(ValueError, match="two architectures are named 'topk'"):
        register(type("Other", (Architecture,), {"name": "topk"}))


@pytest.mark.parametrize("activation, k", [("relu", None), ("topk", 5)])
def test_dense_form_is_the_reference_forward(activation, k):
    """The architecture's dense_activation (the oracle) equals the reference backend's features."""
    sae = SparseAutoencoder(16, 64, "none", activation=activation, k=k, backend="reference")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    x = torch.randn(12, 16)
    _, features, _ = sae(x)
    torch.testing.assert_close(features, sae.architecture.dense_activation(x @ sae.W_enc + sae.b_enc),
                               rtol=1e-6, atol=1e-6)  # addmm vs mm + add: fp32 round-off


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_new_architecture_trains_alike_on_every_backend(probe, backend):
    ops_for(backend)  # skips triton where it cannot run
    torch.manual_seed(0)
    ref = SparseAutoencoder(24, 60, "expected_average_only_in", True, activation="probe", k=3,
                            backend="reference")
    with torch.no_grad():
        ref.b_enc.normal_(0, 0.3)
        ref.b_dec.normal_(0, 0.2)
        ref.activation_mean.normal_(1.0, 0.5)
    ours = SparseAutoencoder(24, 60, "expected_average_only_in", True, activation="probe", k=3,
                             backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 24) + 1.0
    outputs = []
    for sae in (ref, ours):
        reconstructed, features, losses = sae(x)
        losses["loss"].backward()
        outputs.append((reconstructed.detach(), losses))
    (rec_ref, losses_ref), (rec, losses) = outputs
    # fp32, the same products summed in other orders (kernel tiles, CSR): 1e-5 of the largest entry
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * (float(b.abs().max()) or 1.0))
    close(rec, rec_ref)
    assert set(losses) == set(losses_ref) == {"loss", "mse", "l1", "l0", "explained_variance", "aux"}
    for key in losses:
        close(losses[key].detach(), losses_ref[key].detach())
    assert float(losses["l0"]) == 3.0  # B*k over the batch: 3 per token on average
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["aux"])  # no sparsity term
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        close(getattr(ours, name).grad, getattr(ref, name).grad)
    assert int(ours.architecture.batches_seen) == 1
    ours.eval()
    with torch.no_grad():
        _, features, losses = ours(x)
    assert int(ours.architecture.batches_seen) == 1 and bool((features.values > 0).sum(1).le(3).all())


def test_a_new_architecture_saves_and_loads_its_tensors(probe, tmp_path):
    sae = SparseAutoencoder(8, 20, activation="probe", k=2, backend="reference")
    sae.architecture.batches_seen.fill_(7)
    sae.save(tmp_path)
    loaded = SparseAutoencoder.load(tmp_path, backend="reference")
    assert int(loaded.architecture.batches_seen) == 7
    assert torch.equal(loaded.architecture.candidates, sae.architecture.candidates)


@pytest.mark.parametrize("activation, k", [("relu", None), ("topk", 4)])
def test_trainer_warms_up_only_a_sparsity_term_in_the_loss(activation, k):
    sae = SparseAutoencoder(16, 64, "none", activation=activation, k=k, l1_coeff=0.1, backend="reference")
    cfg = TrainConfig(data_dir="unused", output_dir="unused", activation=activation, k=k, l1_warmup_steps=4)
    optimizer = SAEAdam(sae, lr=1e-3)  # the trainer's optimizer; train_step sets lr 0: no update
    loss, _, _, losses = train_step(sae, optimizer, torch.randn(8, 16), cfg, step=0, lr=0.0)
    expected = losses["mse"] + 0.25 * losses["l1"] if activation == "relu" else losses["loss"]
    torch.testing.assert_close(loss, expected)


def test_config_validation_is_the_architectures():
    with pytest.raises(ValueError, match=r"activation='topk' needs k, an int in \[1, d_sae=16\]"):
        SAEConfig(8, d_sae=16, activation="topk")
    with pytest.raises(ValueError, match=r"k=3 is not used with activation='relu'"):
        SAEConfig(8, d_sae=16, k=3)
