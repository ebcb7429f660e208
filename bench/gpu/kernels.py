"""The step's gather kernels and optimizer one by one at the seed's shape, against their memory floors.

    python bench/gpu/kernels.py [--dry-run] [--out DIR]           (run.sh runs it as section `kernels`)

d=7168, d_sae=57344, k=64, B=8192; a top-k-like code (distinct random latents per token). Each kernel:
median of REPS CUDA-event-timed calls after warm-up, the bytes it must move (`hbm_bytes`: each input
read once, each output written once) and the bytes it gathers (`gather_bytes`: B*k rows, served by L2
when the grid keeps a column strip hot), the achieved rates, and the prediction of bench/gpu/NOTES.md.
The copy ceiling is measured first (a device-to-device copy, bytes read + written). Launch configs
of the two gather kernels are swept (each variant checked against the default's output), so one run
picks the fastest. The optimizer: SAEAdam (clip_grad_norm_ + step, fp32 master weights) against the
unfused sequence it replaced. Writes kernels.json.
"""

from __future__ import annotations

import common
import torch

from saetron.kernels import triton_adam, triton_decode, triton_latent_sum
from saetron.kernels.triton_common import latent_csr
from saetron.kernels.triton_decode import sparse_decode_dvalues, sparse_decode_dw, sparse_decode_fwd
from saetron.kernels.triton_decoder_norm import normalize_rows_, remove_parallel_grad_
from saetron.kernels.triton_latent_sum import latent_row_sum

REPS = 10
# NOTES.md's predictions at the seed's shape on an H200 (ms), for the table.
PREDICTED_MS = {"latent_csr": 0.2, "decode_fwd": 1.5, "decode_dvalues": 1.6, "dW_dec": 1.5, "dW_enc": 1.5,
                "decoder_grad_sq": 0.8, "decoder_adam": 2.9, "adam_W_enc": 2.8, "saeadam_clip_step": 7.0,
                "unfused_clip_step": 10.5}
LATENT_SUM_VARIANTS = [  # (BLOCK_L, BLOCK_N, BLOCK_D, num_warps, num_stages); the first is the default
    (16, 32, 256, 4, 3), (32, 64, 128, 4, 3), (32, 32, 128, 4, 3), (16, 64, 128, 4, 3), (16, 32, 256, 4, 2),
    (16, 32, 256, 8, 3), (16, 64, 256, 8, 3)]
DECODE_FWD_VARIANTS = [  # (BLOCK_B, BLOCK_D, UNROLL, num_warps)
    (32, 64, 4, 4), (16, 128, 4, 4), (32, 128, 2, 4), (64, 64, 2, 4), (32, 64, 8, 4), (16, 64, 4, 4)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Recorder:
    def __init__(self, dev: torch.device, reps: int, ceiling_gbs: float | None) -> None:
        self.dev, self.reps, self.ceiling, self.rows = dev, reps, ceiling_gbs, []

    def time(self, name: str, fn, hbm_bytes: float, gather_bytes: float = 0.0, **info) -> dict:
        ms = common.median(common.time_ms(fn, self.dev, 2 if self.dev.type == "cuda" else 0, self.reps))
        row = {"kernel": name, "ms": ms, "predicted_ms": PREDICTED_MS.get(name), "hbm_bytes": hbm_bytes,
               "gather_bytes": gather_bytes, "hbm_gbs": hbm_bytes / ms / 1e6,
               "gather_gbs": gather_bytes / ms / 1e6, **info}
        if self.ceiling:
            row["floor_ms"] = hbm_bytes / (self.ceiling * 1e6)
        self.rows.append(row)
        print(common.format_kernel_row(row), flush=True)
        return row


def copy_ceiling(dev: torch.device, reps: int) -> float | None:
    """GB/s of a 2 GiB device-to-device copy, bytes read + written (None on CPU)."""
    if dev.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.float16, device=dev).normal_()
    dst = torch.empty_like(src)
    ms = common.median(common.time_ms(lambda: dst.copy_(src), dev, 2, reps))
    gbs = 2 * src.numel() * 2 / ms / 1e6
    print(f"copy ceiling: {gbs:,.0f} GB/s (2 GiB device-to-device, read + write)", flush=True)
    return gbs


def code(B: int, d_sae: int, k: int, dev: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=dev).manual_seed(0)
    indices = torch.rand(B, d_sae, device=dev, generator=gen).topk(k, dim=1).indices  # [B, k] distinct
    values = (torch.rand(B, k, device=dev, generator=gen) + 0.1).to(dtype)
    return indices, values


def gather_kernels(rec: Recorder, shape, dev: torch.device, sweep: int) -> None:
    """`sweep`: how many launch configs of each gather kernel to time (the default first)."""
    d, d_sae, k, B = shape
    bf = torch.bfloat16
    indices, values = code(B, d_sae, k, dev, bf)
    W_dec = (torch.randn(d_sae, d, device=dev) / d**0.5).to(bf)
    bias = torch.zeros(d, device=dev, dtype=bf)
    g = torch.randn(B, d, device=dev).to(bf)
    x = torch.randn(B, d, device=dev).to(bf)
    shift = torch.randn(d, device=dev).to(bf)
    rows, slots, row_bytes = B * k, B * k, d * 2
    gathered = rows * row_bytes
    csr_bytes = slots * (8 + 2 + 4 * 2 + 8) + d_sae * 8  # keys in/out, the sort's passes, perm, offsets
    rec.time("latent_csr", lambda: latent_csr(indices, values, d_sae), csr_bytes)
    csr = latent_csr(indices, values, d_sae)

    reference = sparse_decode_fwd(indices, values, W_dec, bias)
    fwd_cfg = dict(triton_decode.DECODE_FWD_CONFIG)
    for i, (bb, bd, unroll, warps) in enumerate(DECODE_FWD_VARIANTS[:sweep]):
        triton_decode.DECODE_FWD_CONFIG.update(BLOCK_B=bb, BLOCK_D=bd, UNROLL=unroll, num_warps=warps)
        try:
            err = rel_err(sparse_decode_fwd(indices, values, W_dec, bias), reference)
            rec.time("decode_fwd" if i == 0 else "decode_fwd_variant",
                     lambda: sparse_decode_fwd(indices, values, W_dec, bias),
                     d_sae * row_bytes + B * row_bytes + slots * 10, gathered,
                     config=f"BLOCK_B={bb} BLOCK_D={bd} UNROLL={unroll} warps={warps}", rel_err=err)
        finally:
            triton_decode.DECODE_FWD_CONFIG.clear()
            triton_decode.DECODE_FWD_CONFIG.update(fwd_cfg)
    rec.time("decode_dvalues", lambda: sparse_decode_dvalues(indices, g, W_dec, values),
             B * row_bytes + slots * 10, gathered)

    out = torch.empty(d_sae, d, device=dev, dtype=bf)
    latent_row_sum(g, indices, values, d_sae, out, csr=csr)
    reference = out.clone()
    sum_cfg = dict(triton_latent_sum.LATENT_SUM_CONFIG)
    for i, (bl, bn, bd, warps, stages) in enumerate(LATENT_SUM_VARIANTS[:sweep]):
        triton_latent_sum.LATENT_SUM_CONFIG.update(BLOCK_L=bl, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
                                                   num_stages=stages)
        try:
            out.fill_(float("nan"))
            latent_row_sum(g, indices, values, d_sae, out, csr=csr)
            rec.time("dW_dec" if i == 0 else "dW_dec_variant",
                     lambda: latent_row_sum(g, indices, values, d_sae, out, csr=csr),
                     B * row_bytes + d_sae * row_bytes + slots * 10, gathered,
                     config=f"BLOCK_L={bl} BLOCK_N={bn} BLOCK_D={bd} warps={warps} stages={stages}",
                     rel_err=rel_err(out, reference))
        finally:
            triton_latent_sum.LATENT_SUM_CONFIG.clear()
            triton_latent_sum.LATENT_SUM_CONFIG.update(sum_cfg)
    # The atomic alternative (one program per token adding into an fp32 buffer; nondeterministic
    # order): zero-fill, read-modify-writes in L2, the cast.
    rec.time("dW_dec_atomic", lambda: sparse_decode_dw(indices, values, g, d_sae, mode="atomic"),
             B * row_bytes + d_sae * d * (4 + 4 + 4 + 2), gathered)
    dW_enc = torch.empty(d, d_sae, device=dev, dtype=bf)
    colsum = torch.empty(d_sae, device=dev)
    rec.time("dW_enc", lambda: latent_row_sum(x, indices, values, d_sae, dW_enc.t(), shift=shift,
                                              colsum=colsum, csr=csr),
             B * row_bytes + d_sae * row_bytes + slots * 10, gathered)


def optimizer(rec: Recorder, shape, dev: torch.device) -> None:
    """fp32 master weights as the trainer keeps them: SAEAdam against the unfused sequence."""
    from saetron.sae import SparseAutoencoder
    from saetron.sae.optim import SAEAdam

    d, d_sae, k, _ = shape
    n = d * d_sae
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, d_sae, "none", activation="topk", k=k, device=dev)
    for p in sae.parameters():
        p.grad = torch.randn_like(p) + 2.0 * p.detach()
    opt = SAEAdam(sae, lr=common.LR)
    opt.clip_grad_norm_(1.0)
    opt.step()  # the states exist from here on

    def fused():
        opt.clip_grad_norm_(1.0)
        opt.step()

    W, G = sae.W_dec.detach(), sae.W_dec.grad
    st = opt.state[sae.W_dec]
    step_args = dict(lr=common.LR, beta1=0.9, beta2=0.999, eps=1e-8, step=2)
    rec.time("decoder_grad_sq", lambda: triton_adam.decoder_grad_sq(W, G), n * 8)
    rec.time("decoder_adam", lambda: triton_adam.decoder_adam_(W, G, st["exp_avg"], st["exp_avg_sq"],
                                                                **step_args), n * 28)
    We, Ge, ste = sae.W_enc.detach(), sae.W_enc.grad, opt.state[sae.W_enc]
    rec.time("adam_W_enc", lambda: triton_adam.adam_(We, Ge, ste["exp_avg"], ste["exp_avg_sq"], **step_args),
             n * 28)
    rec.time("saeadam_clip_step", fused, n * (8 + 4 + 28 + 28))

    base = torch.optim.Adam(sae.parameters(), lr=common.LR, fused=dev.type == "cuda")
    base.step()

    def unfused():  # what the trainer ran before SAEAdam
        remove_parallel_grad_(W, G)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        base.step()
        normalize_rows_(W)

    rec.time("unfused_clip_step", unfused, n * (12 + 8 + 16 + 56 + 8))


def main(argv: list[str] | None = None) -> dict:
    args = common.parse(__doc__.splitlines()[0], argv,
                        **{"--no-sweep": {"action": "store_true", "help": "default launch configs only"}})
    dev = common.device(args.dry_run)
    shape = common.DRY_SHAPES[0] if args.dry_run else common.SHAPES[0]
    reps = 1 if args.dry_run else REPS
    rec = Recorder(dev, reps, copy_ceiling(dev, reps))
    print(f"== kernels at d={shape[0]} d_sae={shape[1]} k={shape[2]} B={shape[3]} (bf16 gathers, "
          "fp32 optimizer)", flush=True)
    variants = 1 if args.no_sweep else (2 if args.dry_run else len(LATENT_SUM_VARIANTS))
    gather_kernels(rec, shape, dev, sweep=variants)
    optimizer(rec, shape, dev)
    result = {"env": common.environment(), "shape": dict(zip(("d", "d_sae", "k", "B"), shape)),
              "copy_ceiling_gbs": rec.ceiling, "rows": rec.rows}
    common.write_json(args.out, "kernels.json", result)
    return result


if __name__ == "__main__":
    main()
