"""Two ranks under torchrun (gloo on CPU, FSDP2): the same run as one process, also across a resume."""

import pytest
import torch
from safetensors.torch import load_file
from train_support import read_metrics, torchrun, train_in_process, write_store

from saetron.sae.checkpoint import complete_checkpoints

FLAGS = ["--d_sae", "96", "--batch_size", "256", "--lr", "1e-2", "--log_every", "2", "--lr_warmup_steps", "3",
         "--l1_coeff", "3e-2", "--l1_warmup_steps", "4", "--dead_window", "1024", "--shuffle_buffer", "2048"]
SMOOTH = ("loss", "mse", "l1", "explained_variance", "lr")


def test_two_ranks_match_one_process_and_resume(tmp_path):
    store = write_store(tmp_path / "store", [2100, 1996], d_model=24)
    one, two = tmp_path / "one", tmp_path / "two"
    train_in_process(store, one, *FLAGS)

    # Two ranks, stopped after the checkpoint of step 8, then resumed to the end (step 16).
    first = torchrun(2, store, two, *FLAGS, "--max_steps", "8", "--checkpoint_every", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(two / "checkpoints")] == ["step_00000004", "step_00000008"]
    second = torchrun(2, store, two, *FLAGS, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and second.stderr.count("final |") == 1  # rank 0 logs alone

    # Each rank computes the mean loss of its half batch and FSDP averages the two gradients, where one
    # process sums the whole batch at once: the same math in another fp32 order. After 16 Adam steps
    # the runs differ by ~1e-7 (weights and losses, measured); 1e-5 leaves 100x margin while any real
    # difference (a wrong slice, a missed all-reduce, a skipped batch) is > 1e-2. The counted metrics
    # can also see a pre-activation within ~1e-7 of 0 fire in one run only: l0 then moves by 1/256 per
    # flipped token, dead_fraction by 1/96 per latent, a latent's firing count by 1 per token; allowed
    # for a few such flips.
    a, b = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in b] == [m["step"] for m in a] == list(range(2, 17, 2))
    for ma, mb in zip(a, b):
        assert [mb[k] for k in SMOOTH] == pytest.approx([ma[k] for k in SMOOTH], rel=1e-5, abs=1e-6)
        assert mb["l0"] == pytest.approx(ma["l0"], abs=4 / 256)
        assert mb["dead_fraction"] == pytest.approx(ma["dead_fraction"], abs=1.5 / 96)
    ours, theirs = load_file(one / "sae.safetensors"), load_file(two / "sae.safetensors")
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-6, msg=name)
    counts = [firing_counts_of(path / "saelens" / "sparsity.safetensors") for path in (one, two)]
    assert (counts[0] - counts[1]).abs().max() <= 3


def firing_counts_of(path, window_tokens: int = 4 * 256) -> torch.Tensor:
    """sparsity.safetensors holds log10(count / window_tokens + 1e-10); back to counts."""
    return torch.round((10 ** load_file(path)["sparsity"].double() - 1e-10) * window_tokens)


def test_two_ranks_with_auxk_and_a_jumprelu_controller(tmp_path):
    """TopK with AuxK active (a 512-token dead window): two ranks are the one-process run (the dead mask is
    global, the AuxK term a mean over tokens). JumpReLU with --target_l0 (start batches, thresholds, the
    controller: all-reduced state) trains, checkpoints and resumes under FSDP2 on two ranks."""
    store = write_store(tmp_path / "store", [2100, 1996], d_model=24)
    flags = ["--d_sae", "96", "--batch_size", "256", "--lr", "1e-2", "--log_every", "4", "--max_steps", "12",
             "--dead_window", "512", "--shuffle_buffer", "2048"]
    topk = [*flags, "--activation", "topk", "--k", "4", "--d_sae", "192"]  # (some latents die)
    train_in_process(store, tmp_path / "one", *topk)
    run = torchrun(2, store, tmp_path / "two", *topk)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert any(m["loss"] > m["mse"] for m in a)  # the AuxK term was on (loss = mse + auxk)
    for ma, mb in zip(a, b):  # tolerances as in the test above
        assert [mb[k] for k in SMOOTH] == pytest.approx([ma[k] for k in SMOOTH], rel=1e-5, abs=1e-6)
        assert mb["dead_fraction"] == pytest.approx(ma["dead_fraction"], abs=1.5 / 192)

    jump = [*flags, "--activation", "jumprelu", "--target_l0", "6", "--jumprelu_start_batches", "4"]
    out = tmp_path / "jump"
    first = torchrun(2, store, out, *jump, "--max_steps", "8", "--checkpoint_every", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, store, out, *jump, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [4, 8, 12] and all("sparsity_coeff" in m for m in lines)
    state = load_file(out / "sae.safetensors")
    assert int(state["architecture.start_batches"]) == 4 and float(state["architecture.threshold_scale"]) > 0
    assert "threshold" in load_file(out / "saelens" / "sae_weights.safetensors")
