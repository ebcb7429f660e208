"""AuxK (sae/architectures/auxk.py) and the dead-latent count it reads (sae/dead_latents.py)."""

import pytest
import torch
from arch_support import BACKENDS, assert_matches_dense, make_sae, model_step, set_dead

from saetron.kernels.selection import RowTopK
from saetron.kernels.sparse_code import SparseCode
from saetron.sae import SparseAutoencoder
from saetron.sae.dead_latents import DeadLatents

DEAD = list(range(3, 60, 3))  # 19 of 60 latents, more than k_aux = 24 // 2 = 12
FEW_DEAD = [7, 20, 41, 55, 58]  # fewer than k_aux: all of them, padding, scale 5/12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("dead", [DEAD, FEW_DEAD], ids=["many_dead", "few_dead"])
def test_auxk_value_and_gradients_match_the_dense_form(backend, activation, dead):
    sae = make_sae(backend, activation, 3)
    set_dead(sae, dead)
    x = torch.randn(16, 24, dtype=sae.W_enc.dtype)
    losses = assert_matches_dense(sae, x)
    assert float(losses["auxk"]) > 0
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["auxk"])  # no sparsity term


@pytest.mark.parametrize("backend", BACKENDS)
def test_auxk_moves_only_dead_latents(backend):
    """The gradient of the AuxK term alone is zero on every live latent's encoder column, encoder bias and
    decoder row, and nonzero on the dead latents it selects; b_dec moves only through the encoder input."""
    sae = make_sae(backend, "topk", 3)
    set_dead(sae, DEAD)
    x = torch.randn(16, 24, dtype=sae.W_enc.dtype)
    _, _, losses = sae(x)
    losses["auxk"].backward()
    live = torch.ones(60, dtype=torch.bool)
    live[DEAD] = False
    assert torch.equal(sae.W_enc.grad[:, live], torch.zeros_like(sae.W_enc.grad[:, live]))
    assert torch.equal(sae.b_enc.grad[live], torch.zeros_like(sae.b_enc.grad[live]))
    assert torch.equal(sae.W_dec.grad[live], torch.zeros_like(sae.W_dec.grad[live]))
    moved = sae.W_dec.grad.abs().sum(1) > 0  # [60]
    assert int(moved[DEAD].sum()) >= 12  # each token selects k_aux = 12 of the 19 dead latents
    assert bool(sae.b_dec.grad.abs().sum() > 0)  # apply_b_dec_to_input: pre depends on b_dec


def test_auxk_only_in_training_with_dead_latents():
    sae = SparseAutoencoder(24, 60, activation="topk", k=3, backend="reference", dead_window=64)
    assert len(sae.architecture.selection_rules()) == 1
    losses, _ = model_step(sae, torch.randn(16, 24))
    assert float(losses["auxk"]) == 0.0  # no dead latent yet: the term is 0 and no second rule runs
    set_dead(sae, DEAD)
    rules = sae.architecture.selection_rules()
    assert len(rules) == 2 and isinstance(rules[1], RowTopK) and rules[1].k == 12
    assert torch.equal(rules[1].mask, sae.architecture.dead_latents.mask)
    sae.eval()
    assert len(sae.architecture.selection_rules()) == 1 and "auxk" not in sae(torch.randn(4, 24))[2]
    off = SparseAutoencoder(24, 60, activation="topk", k=3, backend="reference", aux_k_coeff=0.0)
    set_dead(off, DEAD)
    assert len(off.architecture.selection_rules()) == 1
    assert "auxk" not in model_step(off, torch.randn(4, 24))[0]


def test_k_aux_is_capped_at_d_sae():
    sae = SparseAutoencoder(64, 20, activation="topk", k=2, backend="reference")  # d_in / 2 = 32 > 20
    set_dead(sae, range(20))
    assert sae.architecture.selection_rules()[1].k == 20


def code(fired_latents, tokens: int = 4, zero_latent: int | None = None) -> SparseCode:
    """A code of `tokens` rows where each latent of fired_latents fires once (value 1); zero_latent is
    picked with value 0 (a TopK pick that ReLU zeroed: not a firing)."""
    indices = torch.zeros(tokens, 2, dtype=torch.int64)
    values = torch.zeros(tokens, 2)
    for i, latent in enumerate(fired_latents):
        indices[i, 0], values[i, 0] = latent, 1.0
    if zero_latent is not None:
        indices[0, 1] = zero_latent
    return SparseCode(indices, values)


def test_dead_window_counts_tokens_without_firing():
    """Latents start alive; one is dead once `window` tokens (all ranks) passed without it firing with a
    value > 0; firing resets its count."""
    dead = DeadLatents(d_sae=6, window=12)
    dead.update(code([0, 1], zero_latent=5))  # 4 tokens
    assert dead.tokens_since_fired.tolist() == [0, 0, 4, 4, 4, 4]
    assert not bool(dead.mask.any()) and not dead.may_have_dead()  # known on the host: no AuxK sync
    dead.update(code([0]))
    assert dead.tokens_since_fired.tolist() == [0, 4, 8, 8, 8, 8] and not bool(dead.mask.any())
    dead.update(code([2]))  # 12 tokens without latents 3, 4, 5 firing: dead
    assert dead.tokens_since_fired.tolist() == [4, 8, 0, 12, 12, 12]
    assert dead.mask.tolist() == [False, False, False, True, True, True] and dead.may_have_dead()
    assert float(dead.fraction()) == 0.5
    dead.update(code([3]))  # 3 fires again: alive; 1 reaches the window
    assert dead.mask.tolist() == [False, True, False, False, True, True]


def test_training_forward_counts_and_eval_does_not():
    sae = SparseAutoencoder(24, 60, activation="topk", k=3, backend="torch", dead_window=64)
    x = torch.randn(16, 24)
    sae(x)
    since = sae.architecture.dead_latents.tokens_since_fired
    assert set(since.unique().tolist()) <= {0, 16}
    fired = since == 0
    assert 3 <= int(fired.sum()) <= 48
    sae.eval()
    sae(x)
    assert torch.equal(sae.architecture.dead_latents.tokens_since_fired == 0, fired)
    assert "tokens_since_fired" not in str(list(sae.state_dict()))  # training state, not saved
