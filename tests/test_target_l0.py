"""--target_l0 (sae/sparsity_control.py): the controller's update, its landing on a small store, resume."""

import math

import pytest
import torch
from train_support import read_metrics, train_in_process, write_store

from saetron.sae import SparseAutoencoder
from saetron.sae.config import SAEConfig
from saetron.sae.sparsity_control import KP, MAX_ERROR, L0Controller, input_variance, start_multiplier
from saetron.sae.train_config import TrainConfig


def test_update_is_proportional_integral_in_log_space():
    c = L0Controller(8.0, 10.0, torch.device("cpu"))
    KI_PER_LR = 10.0
    assert float(c.multiplier()) == 1.0
    c.update(torch.tensor(16.0), lr=1e-2)  # e = log 2
    e = math.log(2)
    assert float(c.multiplier()) == pytest.approx(math.exp(KI_PER_LR * 1e-2 * e + KP * e))
    c.update(torch.tensor(8.0), lr=1e-2)  # on target: only the integral remains
    assert float(c.multiplier()) == pytest.approx(math.exp(KI_PER_LR * 1e-2 * e))
    c.update(torch.tensor(8e6), lr=0.0, integrate=False)  # far off: the error is clamped; lr 0 and the
    assert float(c.multiplier()) == pytest.approx(math.exp(KI_PER_LR * 1e-2 * e + KP * MAX_ERROR))  # warm-up
    restored = L0Controller(8.0, 10.0, torch.device("cpu"))
    restored.load_state_dict(c.state_dict())
    assert torch.equal(restored.multiplier(), c.multiplier())


def make_sae(normalization: str) -> SparseAutoencoder:
    return SparseAutoencoder.from_config(SAEConfig(16, d_sae=32, normalize_activations=normalization,
                                                   activation="relu"))


def test_the_start_is_in_units_of_the_input_variance():
    """v is the per-element variance of the normalized input (a direct computation), and the start v^p
    follows the data's scale: x 10 -> x 100 at p = 1 (jumprelu's), x 10 at p = 1/2, unchanged at p = 0
    (relu's); the controller begins at that multiplier."""
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(300, 16, generator=g) + torch.randn(16, generator=g)  # [N, d] with an offset
    centered = make_sae("expected_average_only_in")
    centered.estimate_activation_mean([x[:100]])  # another mean than x's: v is around x's own mean
    assert input_variance(centered, x, chunk_rows=64) == pytest.approx(x.var(0, unbiased=False).mean().item(),
                                                                       rel=1e-6)
    layer_norm = make_sae("layer_norm")
    x_n = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)
    assert input_variance(layer_norm, x) == pytest.approx(x_n.var(0, unbiased=False).mean().item(), rel=1e-5)

    plain = make_sae("none")
    v, v10 = input_variance(plain, x), input_variance(plain, 10 * x)
    assert v10 == pytest.approx(100 * v, rel=1e-6)
    assert start_multiplier(v10, 1.0) == pytest.approx(100 * start_multiplier(v, 1.0), rel=1e-6)
    assert start_multiplier(v10, 0.5) == pytest.approx(10 * start_multiplier(v, 0.5), rel=1e-6)
    assert start_multiplier(v10, 0.0) == start_multiplier(v, 0.0) == 1.0
    assert float(L0Controller(8.0, 10.0, torch.device("cpu"), start=v).multiplier()) == pytest.approx(v)
    with pytest.raises(ValueError, match="start multiplier must be a finite number > 0; got 0.0"):
        L0Controller(8.0, 10.0, torch.device("cpu"), start=0.0)


def test_target_l0_is_validated():
    with pytest.raises(ValueError, match=r"target_l0 steers a sparsity coefficient.*'topk'.*jumprelu.*relu"):
        TrainConfig("d", "o", activation="topk", k=4, target_l0=8.0)
    with pytest.raises(ValueError, match=r"target_l0 must be a number in \(0, d_sae=64\]; got 65"):
        TrainConfig("d", "o", d_sae=64, target_l0=65)
    with pytest.raises(ValueError, match=r"target_l0 must be a finite number > 0; got -1"):
        L0Controller(-1, 10.0, torch.device("cpu"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store"), [2048, 2048])


# 128 latents on a store of ~4 active features per token (train_support.synthetic_activations), a high lr
# (Adam moves each weight ~lr per step): the L0 responds within tens of steps. Each case ran in 3-6 s on
# 2 shared CPU cores.
FLAGS = ["--d_sae", "128", "--batch_size", "256", "--lr", "1e-2", "--log_every", "10", "--epochs", "100",
         "--dead_window", "2048", "--target_l0", "8"]


@pytest.mark.parametrize("activation, steps, coeff", [("relu", 200, ["--l1_coeff", "1e-3"]),
                                                       ("jumprelu", 300, ["--l0_coeff", "1e-3"])])
def test_lands_within_ten_percent_of_the_target(store, tmp_path, activation, steps, coeff):
    """The mean L0 of the last 50 steps is within 10% of 8, from a start at L0 ~60 (relu) or 8 (jumprelu,
    whose thresholds start at the target and must hold it while the encoder grows)."""
    train_in_process(store, tmp_path, *FLAGS, "--activation", activation, "--max_steps", str(steps), *coeff)
    lines = read_metrics(tmp_path)
    last = [m["l0"] for m in lines[-5:]]  # 5 windows of 10 steps
    assert sum(last) / len(last) == pytest.approx(8, rel=0.1), [m["l0"] for m in lines]
    assert all("sparsity_coeff" in m for m in lines)
    assert lines[-1]["explained_variance"] > 0.5


def test_the_controller_resumes(store, tmp_path):
    """Stopped after a checkpoint and resumed, the run is the uninterrupted one (the controller's state and
    JumpReLU's start counter and thresholds included)."""
    flags = [*FLAGS, "--activation", "jumprelu", "--jumprelu_start_batches", "6", "--max_steps", "20",
             "--log_every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_in_process(store, full, *flags)
    train_in_process(store, part, *flags[:-4], "--log_every", "2", "--max_steps", "10",
                     "--checkpoint_every", "10")
    with pytest.raises(ValueError, match=r"settings .* differ"):
        train_in_process(store, part, *flags, "--resume", "--target_l0", "9")
    train_in_process(store, part, *flags, "--resume")
    drop = ("tokens_per_s",)
    a, b = ([{k: v for k, v in m.items() if k not in drop} for m in read_metrics(p)] for p in (full, part))
    assert a == b and a[-1]["sparsity_coeff"] != 1e-3  # the coefficient moved, and resumed where it was
