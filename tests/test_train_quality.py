"""The trainer's quality settings: normal-row EV and median FVU, the outlier-row filter, the lr default."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_support import read_metrics, synthetic_activations, train_in_process, write_store

from saetron.sae.dead_latents import DeadLatents
from saetron.sae.distributed import init_distributed, shutdown_distributed
from saetron.sae.losses import explained_variance_of, normal_rows, per_token_fvu
from saetron.sae.metrics import Metrics
from saetron.sae.row_stats import RowStatistics, keep_rows, norm_limit
from saetron.sae.train import parse_args
from saetron.sae.train_config import TrainConfig

D = 16


@pytest.fixture
def one_rank():
    env = init_distributed()
    yield env
    shutdown_distributed(env, completed=True)


def batch_with_outlier(seed: int, outlier_row: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [64, D] and a reconstruction with ~25% unexplained variance; the outlier row (norm 100x the median)
    reconstructed well, as an SAE fitting the attention sinks does: the pooled EV then hides the rest."""
    g = torch.Generator().manual_seed(seed)
    x = synthetic_activations(64, D, n_features=40, active=4.0, seed=seed)
    recon = x + 0.3 * torch.randn(x.shape, generator=g)
    if outlier_row is not None:
        x[outlier_row] = 100 * x.norm(dim=-1).median() * torch.nn.functional.normalize(torch.ones(D), dim=0)
        recon[outlier_row] = 0.95 * x[outlier_row]  # leaves 0.25% of the row's (huge) norm^2 unexplained
    return x, recon


def test_metrics_match_direct_computation(one_rank):
    batches = [batch_with_outlier(1, outlier_row=5), batch_with_outlier(2, outlier_row=None)]
    x_all = torch.cat([b[0] for b in batches])
    recon_all = torch.cat([b[1] for b in batches])
    median_norm = x_all.norm(dim=-1).median()
    mean = x_all.mean(0)
    metrics = Metrics(40, D, 64, DeadLatents(40, window=640), density_from_step=0, device=torch.device("cpu"),
                      mean=mean, median_norm=median_norm.item())
    for step, (x, recon) in enumerate(batches):
        features = torch.zeros(64, 40)
        features[:, step] = 1.0
        zero = torch.zeros(())
        metrics.update(step, zero, {"mse": zero, "l1": zero, "l0": zero}, x, recon, features,
                       torch.tensor(step + 2))
    m = metrics.compute(2, 1e-3, 1.0)

    normal = normal_rows(x_all, median_norm)
    assert normal.sum().item() == 127 and not normal[5]  # the planted row alone is out
    pooled = explained_variance_of(x_all, recon_all).item()
    normal_ev = explained_variance_of(x_all[normal], recon_all[normal]).item()
    # float64 window sums against fp32 direct ones: equal to ~1e-6.
    assert m["explained_variance"] == pytest.approx(pooled, abs=1e-5)
    assert m["explained_variance_normal"] == pytest.approx(normal_ev, abs=1e-5)
    assert pooled - normal_ev > 0.1  # the outlier lifts the pooled figure; the normal one ignores it
    # The histogram's median is its bin's geometric centre: within half a bin width (0.28%) of the exact.
    exact = per_token_fvu(x_all, recon_all, mean).median().item()
    assert m["median_fvu"] == pytest.approx(exact, rel=3e-3)
    assert m["skipped_rows"] == 2 + 3
    again = metrics.compute(2, 1e-3, 1.0)  # a new window: nothing seen yet
    assert again["skipped_rows"] == 0 and again["median_fvu"] != again["median_fvu"]  # NaN


def test_keep_rows_skips_exactly_the_rows_over_the_limit():
    x = synthetic_activations(50, D, n_features=40, active=4.0, seed=3)
    planted = [0, 17, 49]
    stats = RowStatistics(D, keep_first=8)
    stats.add(x)
    limit = norm_limit(10.0, stats.median_norm)
    for i in planted:
        x[i] *= 11 * stats.median_norm / x[i].norm()
    kept, skipped = keep_rows(x, limit)
    others = [i for i in range(50) if i not in planted]
    torch.testing.assert_close(kept, x[others], rtol=0, atol=0)
    assert skipped.item() == 3
    assert keep_rows(x, norm_limit(0.0, stats.median_norm))[1].item() == 0  # ratio 0: filter off
    assert stats.first_rows.shape == (8, D) and stats.rows == 50
    with pytest.raises(RuntimeError, match=r"all 3 rows of a batch have norms above"):
        keep_rows(x[planted], limit)


def test_trainer_skips_and_counts_planted_rows(tmp_path):
    store = write_store(tmp_path / "store", [1024, 1024], d_model=D, n_features=40)
    planted = {0: [3, 500, 1000], 1: [7]}  # shard -> rows scaled to 50x the median norm
    for shard, rows in planted.items():
        path = store / f"shard_{shard:05d}.safetensors"
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()  # the collector's shard header, which the trainer checks
        x = tensors["activations"]
        x[rows] *= 50 * x.norm(dim=-1).median() / x[rows].norm(dim=-1, keepdim=True)
        save_file(tensors, path, metadata=metadata)
    flags = ["--d_sae", "32", "--activation", "topk", "--k", "4", "--batch_size", "256", "--max_steps", "8",
             "--log_every", "2"]  # 8 steps of 256: every row once
    train_in_process(store, tmp_path / "on", *flags)
    assert sum(m["skipped_rows"] for m in read_metrics(tmp_path / "on")) == 4
    train_in_process(store, tmp_path / "off", *flags, "--max_norm_ratio", "0")
    assert sum(m["skipped_rows"] for m in read_metrics(tmp_path / "off")) == 0
    resolved = json.loads((tmp_path / "on" / "train_config.json").read_text())
    assert resolved["encoder_init"] == "transpose" and resolved["encoder_scale"] > 0
    assert resolved["median_norm"] > 0


def test_lr_default_is_applied_and_documented(capsys):
    assert TrainConfig("d", "o", d_sae=4608).lr == pytest.approx(2e-4 / (4608 / 16384) ** 0.5, rel=1e-12)
    assert TrainConfig("d", "o", d_sae=16384).lr == pytest.approx(2e-4, rel=1e-12)
    assert TrainConfig("d", "o", d_sae=16384, lr=1e-3).lr == 1e-3
    parsed = parse_args(["--data_dir", "d", "--output_dir", "o", "--d_sae", "4608"])
    assert parsed.lr == pytest.approx(3.7712e-4, rel=1e-4)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Not given: 2e-4 / sqrt(d_sae / 2^14)" in help_text
    assert "--encoder_init {transpose,kaiming}" in help_text
    with pytest.raises(ValueError, match="max_norm_ratio must be 0"):
        TrainConfig("d", "o", max_norm_ratio=0.5)
