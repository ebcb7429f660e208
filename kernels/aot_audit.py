"""AOT audit: compile every saetron Triton kernel for sm_90a and sm_80 at production shapes, no GPU needed.

    python -m saetron.kernels.aot_audit            # the table; exit status 1 if a check fails
    python -m saetron.kernels.aot_audit --json     # one JSON object per (kernel, arch), for tests

For each kernel, arch and production shape, with exactly the constexprs, warps and stages the
launchers use: `triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...))`.
Read back:
  - registers per thread and the block's static shared memory: `cuobjdump -res-usage` on the cubin
    (the cuobjdump shipped in the triton wheel; sm_80+ reserve 1 KiB of it per block);
  - dynamic shared memory: the compiled kernel's metadata (what the launch requests);
  - spill bytes: the `-v` log of the ptxas run inside triton.compile ("bytes spill stores/loads");
  - tensor-core instructions in the PTX: `wgmma.mma_async` (sm_90a) or `mma.sync` (sm_80).
Checks (any failure makes `main` exit 1): no spills; dynamic shared memory within the per-block
opt-in limit (227 KiB sm_90, 163 KiB sm_80) and dynamic + static within the SM (228 / 164 KiB);
the GEMM-shaped kernels (none today: the encoder GEMM is cuBLAS) use tensor cores.

Shapes change runtime integers, not constexprs (every production size is a multiple of 16, so the
divisibility specialization is the same too): each (kernel, arch, constexpr set) compiles once and
the table lists it per shape with the shape's grid. Compiling needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import (
    triton_adam,
    triton_decode,
    triton_decoder_norm,
    triton_encoder_bwd,
    triton_latent_sum,
    triton_select,
)

ARCHS = {"sm_90a": 90, "sm_80": 80}
SMEM_PER_BLOCK = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}  # opt-in dynamic maximum per block
SMEM_PER_SM = {"sm_90a": 228 * 1024, "sm_80": 164 * 1024}
TENSOR_CORE_OP = {"sm_90a": "wgmma.mma_async", "sm_80": "mma.sync"}
# (name, d, d_sae, k, B): SmolLM2's width x8 and the seed model's (DeepSeek-V3) width x8.
SHAPES = [("smollm2", 576, 4608, 64, 4096), ("deepseek", 7168, 57344, 64, 4096)]
DTYPE = "bf16"  # production training dtype of activations and weights


@dataclass
class Spec:
    """One kernel compile: signature types, constexprs and the launch's warps/stages."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    values: dict[str, int] = field(default_factory=dict)  # runtime ints (divisibility attrs)
    num_warps: int = 4
    num_stages: int = 2
    gemm: bool = False
    mma: bool = False  # a segmented sum as small tensor-core products: mma.sync or wgmma, either will do
    grid: tuple[int, ...] = ()


def _spec(name, kernel, args: dict[str, object], consts: dict[str, object], grid, **kw) -> Spec:
    """args: name -> pointer type string ('*bf16') or a runtime int/float value.

    An int equal to 1 becomes a constexpr, as triton's launcher specializes it at run time.
    """
    signature, values = {}, {}
    consts = dict(consts)
    for arg, v in args.items():
        if isinstance(v, int) and v == 1:
            consts[arg] = 1
        elif isinstance(v, str):
            signature[arg] = v
        elif isinstance(v, float):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32" if abs(v) < 2**31 else "i64"
            values[arg] = v
    for arg in consts:
        signature[arg] = "constexpr"
    signature = {arg: signature[arg] for arg in list(args) + [a for a in consts if a not in args]}
    return Spec(name, kernel, signature, consts, values, grid=tuple(grid), **kw)


def specs(d: int, d_sae: int, k: int, B: int, arch: str = "sm_90a") -> list[Spec]:
    """Every kernel as its launcher runs it at this shape (bf16 data, GPU configs)."""
    cdiv = triton.cdiv
    p = f"*{DTYPE}"
    out: list[Spec] = []
    dec = dict(BLOCK_K=triton_decode.BLOCK_K, BLOCK_D=triton_decode.BLOCK_D)
    fwd = dict(triton_decode.DECODE_FWD_CONFIG)
    fwd_launch = dict(num_warps=fwd.pop("num_warps"), num_stages=fwd.pop("num_stages"))
    out.append(_spec("decode_fwd", triton_decode._sparse_decode_fwd_kernel, dict(
        indices_ptr="*i64", values_ptr=p, w_ptr=p, bias_ptr=p, out_ptr=p,
        stride_idx_b=k, stride_w_m=d, stride_out_b=d, B=B, K=k, d=d), fwd,
        (cdiv(B, fwd["BLOCK_B"]), cdiv(d, fwd["BLOCK_D"])), **fwd_launch))
    out.append(_spec("decode_dvalues", triton_decode._sparse_decode_dvalues_kernel, dict(
        indices_ptr="*i64", g_ptr=p, w_ptr=p, dvalues_ptr=p,
        stride_idx_b=k, stride_g_b=d, stride_w_m=d, K=k, d=d), dec, (B, cdiv(k, dec["BLOCK_K"]))))
    out.append(_spec("decode_dW_atomic", triton_decode._sparse_decode_dw_atomic_kernel, dict(
        indices_ptr="*i64", values_ptr=p, g_ptr=p, dw_ptr="*fp32",
        stride_idx_b=k, stride_g_b=d, stride_dw_m=d, K=k, d=d), dec, (B, cdiv(d, dec["BLOCK_D"]))))
    ls = dict(triton_latent_sum.LATENT_SUM_CONFIG)
    ls_launch = dict(num_warps=ls.pop("num_warps"), num_stages=ls.pop("num_stages"))
    ls_grid = (cdiv(d_sae, ls["BLOCK_L"]), cdiv(d, ls["BLOCK_D"]))
    # dW_dec is row-major [d_sae, d]; dW_enc is written through the transpose of a [d, d_sae] tensor.
    for name, has_shift, out_strides in (("decode_dW_sorted", False, (d, 1)),
                                         ("encoder_dW_db", True, (1, d_sae))):
        out.append(_spec(name, triton_latent_sum._latent_row_sum_kernel, dict(
            rows_ptr=p, shift_ptr=p, weights_ptr=p, perm_ptr="*i64", offsets_ptr="*i64", out_ptr=p,
            colsum_ptr="*fp32", stride_rows_b=d, stride_out_m=out_strides[0], stride_out_d=out_strides[1],
            K=k, d=d, d_sae=d_sae), dict(HAS_SHIFT=has_shift, WRITE_COLSUM=has_shift, DOT_DTYPE=tl.bfloat16,
                                         PRECISION="ieee", **ls), ls_grid, mma=True, **ls_launch))
    gemv = dict(BLOCK_R=triton_encoder_bwd.GEMV_BLOCK_R, BLOCK_C=triton_encoder_bwd.GEMV_BLOCK_C)
    out.append(_spec("encoder_dshift_gemv", triton_encoder_bwd._gemv_kernel, dict(
        a_ptr=p, v_ptr="*fp32", out_ptr=p, stride_a_r=d_sae, R=d, C=d_sae, scale=-1.0),
        gemv, (cdiv(d, gemv["BLOCK_R"]),)))
    out += _select_specs(d_sae, k, B, p)
    dn = dict(BLOCK_M=triton_decoder_norm.BLOCK_M, BLOCK_D=triton_decoder_norm.BLOCK_D)
    out.append(_spec("decoder_remove_parallel", triton_decoder_norm._remove_parallel_grad_kernel, dict(
        w_ptr="*fp32", g_ptr="*fp32", stride_w_m=d, stride_g_m=d, m=d_sae, d=d),
        dict(TINY=triton_decoder_norm.TINY, **dn), (cdiv(d_sae, dn["BLOCK_M"]),)))
    out.append(_spec("decoder_normalize_rows", triton_decoder_norm._normalize_rows_kernel, dict(
        w_ptr="*fp32", stride_w_m=d, m=d_sae, d=d),
        dict(EPS=triton_decoder_norm.EPS, **dn), (cdiv(d_sae, dn["BLOCK_M"]),)))
    # The optimizer on the trainer's fp32 master weights and states (W_enc flat, W_dec row by row).
    f32, hyper = "*fp32", dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-4, bc2_sqrt=0.5)
    n = d * d_sae
    out.append(_spec("adam", triton_adam._adam_kernel, dict(
        p_ptr=f32, g_ptr=f32, m_ptr=f32, v_ptr=f32, scale_ptr=f32, n=n, **hyper),
        dict(HAS_SCALE=True, BLOCK=triton_adam.ADAM_BLOCK), (cdiv(n, triton_adam.ADAM_BLOCK),)))
    row = triton_adam._row_launch(d)
    row_consts = dict(TINY=triton_adam.TINY, BLOCK_D=row["BLOCK_D"])
    out.append(_spec("decoder_adam", triton_adam._decoder_adam_kernel, dict(
        w_ptr=f32, g_ptr=f32, m_ptr=f32, v_ptr=f32, scale_ptr=f32, stride_w=d, stride_g=d, stride_m=d,
        stride_v=d, d=d, **hyper), dict(HAS_SCALE=True, EPS_NORM=triton_adam.EPS_NORM, **row_consts),
        (d_sae,), num_warps=row["num_warps"]))
    out.append(_spec("decoder_grad_sq", triton_adam._decoder_grad_sq_kernel, dict(
        w_ptr=f32, g_ptr=f32, out_ptr=f32, stride_w=d, stride_g=d, d=d), row_consts, (d_sae,),
        num_warps=row["num_warps"]))
    return out


def _select_specs(d_sae: int, k: int, B: int, p: str) -> list[Spec]:
    """The selects of triton_select.py on one bf16 pre-activation chunk [rows, d_sae] (rows = B here:
    one chunk at both shapes): the 2 radix passes of 16-bit keys, resolve, the batch's count, and the
    emit as RowTopK (per-row key), Threshold (by value) and BatchTopK (shared key, CSR offsets) run it."""
    ts, rows = triton_select, B
    row = dict(stride_pre=d_sae)
    specs = [_spec(f"select_hist_{name}", ts._radix_hist_kernel, dict(
        pre_ptr=p, mask_ptr="*i1", prefix_ptr="*i32", hist_ptr="*i32", **row, state_stride=1, N=d_sae,
        n_total=rows * d_sae), dict(SHIFT=shift, KEY_BITS=16, HAS_MASK=False, BLOCK_N=ts.BLOCK_N), (rows,),
        num_warps=ts.NUM_WARPS) for name, shift in (("hi", 8), ("lo", 0))]
    specs.append(_spec("select_resolve", ts._radix_resolve_kernel, dict(
        hist_ptr="*i32", prefix_ptr="*i32", remaining_ptr="*i32"), {}, (rows,), num_warps=ts.NUM_WARPS))
    specs.append(_spec("select_count", ts._select_count_kernel, dict(
        pre_ptr=p, key_ptr="*i32", above_ptr="*i32", ties_ptr="*i32", **row, N=d_sae, n_total=rows * d_sae),
        dict(KEY_BITS=16, BLOCK_N=ts.BLOCK_N), (rows,), num_warps=ts.NUM_WARPS))
    for name, by_value, starts, width in (("emit_topk", False, False, k), ("emit_threshold", True, False,
                                          ts.THRESHOLD_FIRST_CAPACITY), ("emit_batch", False, True, d_sae)):
        specs.append(_spec(f"select_{name}", ts._select_emit_kernel, dict(
            pre_ptr=p, mask_ptr="*i1", theta_ptr="*fp32", key_ptr="*i32", quota_ptr="*i32", starts_ptr="*i64",
            indices_ptr="*i64", values_ptr=p, counts_ptr="*i32", **row, key_stride=0 if starts else 1,
            theta_stride=1, N=d_sae, n_total=rows * d_sae, limit=width, out_row_stride=width,
            index_row_stride=d_sae if starts else 0),
            dict(BY_VALUE=by_value, KEY_BITS=16, HAS_MASK=False, HAS_STARTS=starts, BLOCK_N=ts.BLOCK_N),
            (rows,), num_warps=ts.NUM_WARPS))
    return specs


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_CACHE: dict[tuple, dict] = {}
# Results persist across runs (a compile of the topk encode takes ~25 s), keyed by triton's version,
# the kernel's source hash (JITFunction.cache_key covers its source) and every compile input.
CACHE_FILE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                          "saetron", "aot_audit.json")


def _load_disk_cache() -> dict:
    try:
        with open(CACHE_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_disk_cache(entries: dict) -> None:
    os.makedirs(os.path.dirname(CACHE_FILE), exist_ok=True)
    tmp = f"{CACHE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, CACHE_FILE)


def compile_spec(spec: Spec, arch: str, disk_cache: dict | None = None) -> dict:
    """Compile one spec for one arch (cached per kernel source, arch, signature and constexprs)."""
    from triton import knobs

    attrs = {}
    names = list(spec.signature)
    for i, arg in enumerate(names):
        t = spec.signature[arg]
        if t.startswith("*") or (arg in spec.values and spec.values[arg] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    key = (spec.kernel.fn, arch, tuple(spec.signature.items()), tuple(sorted(attrs)),
           tuple(sorted((k, str(v)) for k, v in spec.constexprs.items())), spec.num_warps, spec.num_stages)
    if key in _CACHE:
        return _CACHE[key]
    disk_key = "|".join([triton.__version__, spec.kernel.cache_key, arch, repr(key[2:])])
    if disk_cache is not None and disk_key in disk_cache:
        _CACHE[key] = disk_cache[disk_key]
        return _CACHE[key]
    src = ASTSource(spec.kernel, spec.signature, constexprs=spec.constexprs, attrs=attrs)
    log = io.StringIO()
    # always_compile: a hit in triton's own cache skips ptxas, and with it the spill report.
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    if "bytes spill" not in log.getvalue():
        raise RuntimeError(f"no ptxas -v report captured for {spec.name} ({arch}); cannot read spills")
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if usage is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line for {spec.name}:\n{res.stdout}")
    regs, stack, static_smem, local = (int(g) for g in usage.groups())
    ptx = compiled.asm["ptx"]
    result = {
        "regs": regs, "spill_bytes": spills, "stack": stack, "local": local,
        "smem_dynamic": int(compiled.metadata.shared), "smem_static": static_smem,
        "tensor_core": TENSOR_CORE_OP[arch] in ptx,
        "mma_sync": "mma.sync" in ptx,
        "target": re.search(r"\.target (\S+)", ptx).group(1),
    }
    _CACHE[key] = result
    if disk_cache is not None:
        disk_cache[disk_key] = result
    return result


def audit(use_disk_cache: bool = True) -> list[dict]:
    """One row per (shape, kernel, arch) with resources and a list of failed checks."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the AOT audit compiles real kernels: run it with TRITON_INTERPRET unset")
    disk = _load_disk_cache() if use_disk_cache else None
    rows = []
    for shape, d, d_sae, k, B in SHAPES:
        for spec_90, spec_80 in zip(specs(d, d_sae, k, B, "sm_90a"), specs(d, d_sae, k, B, "sm_80")):
            for arch, spec in (("sm_90a", spec_90), ("sm_80", spec_80)):
                r = compile_spec(spec, arch, disk)
                failures = []
                if r["spill_bytes"] or r["local"]:
                    failures.append(f"spills {r['spill_bytes']} B (local {r['local']} B)")
                if r["smem_dynamic"] > SMEM_PER_BLOCK[arch]:
                    failures.append(f"smem {r['smem_dynamic']} B > {SMEM_PER_BLOCK[arch]} B per block")
                if r["smem_dynamic"] + r["smem_static"] > SMEM_PER_SM[arch]:
                    total = r["smem_dynamic"] + r["smem_static"]
                    failures.append(f"smem {total} B > {SMEM_PER_SM[arch]} B per SM")
                if spec.mma and not (r["tensor_core"] or r.get("mma_sync")):
                    failures.append("no tensor-core instruction (wgmma or mma.sync) in the PTX")
                if spec.gemm and not r["tensor_core"]:
                    failures.append(f"no {TENSOR_CORE_OP[arch]} in the PTX of a GEMM kernel")
                programs = 1
                for g in spec.grid:
                    programs *= g
                rows.append({"shape": shape, "kernel": spec.name, "arch": arch, "gemm": spec.gemm,
                             "mma": spec.mma, "warps": spec.num_warps, "stages": spec.num_stages,
                             "programs": programs,
                             **r, "failures": failures})
    if disk is not None:
        _save_disk_cache(disk)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'shape':<9} {'kernel':<24} {'arch':<7} {'warps':>5} {'regs':>4} {'spill':>5} "
            f"{'smem KiB':>8} {'tensor core':<16} {'programs':>9}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        tc = (TENSOR_CORE_OP[r["arch"]] if r["tensor_core"] else "-") if r["gemm"] else "n/a"
        if r.get("mma"):
            tc = TENSOR_CORE_OP[r["arch"]] if r["tensor_core"] else ("mma.sync" if r.get("mma_sync") else "-")
        smem = (r["smem_dynamic"] + r["smem_static"]) / 1024
        status = "ok" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])
        lines.append(f"{r['shape']:<9} {r['kernel']:<24} {r['arch']:<7} {r['warps']:>5} {r['regs']:>4} "
                     f"{r['spill_bytes']:>5} {smem:>8.1f} {tc:<16} {r['programs']:>9}  {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    parser.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: {CACHE_FILE})")
    args = parser.parse_args(argv)
    rows = audit(use_disk_cache=not args.no_cache)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
