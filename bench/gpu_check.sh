#!/usr/bin/env bash
# Prepared GPU check of the fused Triton kernels (issue 3), for a session that has a CUDA device.
#
#   bash bench/gpu_check.sh            # results under $OUT (default bench/out/gpu_check)
#
# 1. the CUDA tests: tests/test_triton_cuda.py (production shapes) and the kernel tests compiled on
#    CUDA (tests/test_triton_{decode,encode,decoder_norm}.py pick the GPU when there is one);
# 2. one full TopK training step at d=7168, d_sae=57344, k=64, B=8192 in bf16 (encode, decode, MSE,
#    backward, decoder-norm projection, Adam, renormalization), timed with CUDA events, printing
#    tokens/s and TFLOP/s as a fraction of the encoder GEMM's roofline (the same GEMM by cuBLAS,
#    measured in this run, and the datasheet peak). Target: >= 50%.
# Needs a python with CUDA torch and triton (PY, default python3); imports saetron from this
# checkout through a symlink tree, so nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/bench/out/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
SHIM=$(mktemp -d)
mkdir -p "$SHIM/saetron"
for pkg in kernels sae collect; do [ -d "$REPO/$pkg" ] && ln -s "$REPO/$pkg" "$SHIM/saetron/$pkg"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{ nvidia-smi || true; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"

set +e
timeout 400 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_cuda.py tests/test_triton_decode.py \
    tests/test_triton_encode.py tests/test_triton_decoder_norm.py 2>&1 | tee "$OUT/cuda_tests.txt"
TESTS_RC=${PIPESTATUS[0]}
set -e

"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/step.txt"
"""One TopK training step at d=7168, d_sae=57344, k=64, B=8192 (bf16) on the Triton kernels."""
import json
import sys

import torch

from saetron.kernels.triton_ops import decode, encode, normalize_rows_, remove_parallel_grad_

out_dir = sys.argv[1]
d, d_sae, k, B = 7168, 57344, 64, 8192
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
W_enc = torch.nn.Parameter((torch.randn(d, d_sae, device=dev) / d**0.5).to(dt))
b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=dev, dtype=dt))
W_dec = torch.nn.Parameter(W_enc.detach().t().contiguous())
b_dec = torch.nn.Parameter(torch.zeros(d, device=dev, dtype=dt))
mean = torch.zeros(d, device=dev, dtype=dt)
x = torch.randn(B, d, device=dev, dtype=dt)
opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4, fused=True)


def step():
    code = encode(x, mean, W_enc, b_enc, "topk", k=k)
    recon = decode(code.indices, code.values, W_dec, b_dec + mean)
    loss = (recon.float() - x.float()).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        remove_parallel_grad_(W_dec.detach(), W_dec.grad)
    opt.step()
    with torch.no_grad():
        normalize_rows_(W_dec.detach())
    return loss


def timed(fn, iters):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def phase_times():
    """Seconds of each phase, one at a time (synchronized), to show where the step goes."""
    res = {}
    res["encode"] = timed(lambda: encode(x, mean, W_enc, b_enc, "topk", k=k), 5)
    code = encode(x, mean, W_enc, b_enc, "topk", k=k)
    res["decode_fwd"] = timed(lambda: decode(code.indices, code.values.detach(), W_dec.detach(), b_dec.detach()), 5)
    return res


step_s = timed(step, 5)
gemm_s = timed(lambda: x @ W_enc.detach(), 10)
gemm_flops = 2 * B * d * d_sae
# Useful FLOPs of the sparse step: the encoder GEMM plus the B*k-row gathers of decode (fwd),
# dvalues, dW_dec and dW_enc (2*B*k*d each) and the dshift mat-vec (2*d*d_sae).
step_flops = gemm_flops + 4 * 2 * B * k * d + 2 * d * d_sae
name = torch.cuda.get_device_name()
peak = 989e12 if ("H100" in name or "H200" in name) else (312e12 if "A100" in name else float("nan"))
res = {
    "device": name, "d": d, "d_sae": d_sae, "k": k, "B": B, "dtype": "bf16",
    "step_ms": step_s * 1e3, "tokens_per_s": B / step_s,
    "step_tflops": step_flops / step_s / 1e12,  # tflops = flops / seconds / 1e12
    "cublas_gemm_ms": gemm_s * 1e3, "cublas_gemm_tflops": gemm_flops / gemm_s / 1e12,
    "fraction_of_measured_gemm_roofline": (step_flops / step_s) / (gemm_flops / gemm_s),
    "fraction_of_datasheet_peak": step_flops / step_s / peak,
    "phases_ms": {key: v * 1e3 for key, v in phase_times().items()},
    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
}
print(json.dumps(res, indent=2))
with open(f"{out_dir}/step.json", "w") as f:
    json.dump(res, f, indent=2)
EOF
rm -rf "$SHIM"
echo "cuda tests exit status: $TESTS_RC (log: $OUT/cuda_tests.txt); step: $OUT/step.json"
exit "$TESTS_RC"
