"""The seed's own check, as written, with saetron's import (d_model 7168, d_sae 57344)."""

import torch

from saetron.kernels.sparse_code import SparseCode
from saetron.sae import SparseAutoencoder


def test_seed_check_runs_as_written():
    sae = SparseAutoencoder(7168, 57344, "expected_average_only_in", False)
    x = torch.randn(10, 7168)
    recon, feat, loss_dict = sae(x)
    assert recon.shape == (10, 7168)
    # backend auto on CPU: features come back as a SparseCode (dense [B, d_sae] on "reference")
    assert isinstance(feat, SparseCode)
    assert feat.to_dense(57344).shape == (10, 57344)
    assert set(loss_dict) >= {"loss", "mse", "l1", "l0", "explained_variance"}
    assert torch.isfinite(loss_dict["loss"])
