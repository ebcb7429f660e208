"""Where one saetron training step's GPU time goes: torch.profiler's kernel table at the seed's shape.

    python bench/gpu/profile_step.py [--dry-run] [--out DIR]      (run.sh runs it as section `profile`)

The trainer's step (common.saetron_step, backend auto, bf16 parameters) at d=7168, d_sae=57344, k=64,
B=8192: 3 warm-up steps, then STEPS profiled steps. Prints the table sorted by device time and writes
profile.json: per kernel/op, device milliseconds per step and calls per step, and the table's text.
"""

from __future__ import annotations

import common
import torch
from torch.profiler import ProfilerActivity, profile

STEPS = 3


def main(argv: list[str] | None = None) -> dict:
    args = common.parse(__doc__.splitlines()[0], argv)
    dev = common.device(args.dry_run)
    d, d_sae, k, B = common.DRY_SHAPES[0] if args.dry_run else common.SHAPES[0]
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(B, d, device=dev, generator=gen).to(torch.bfloat16)
    step = common.saetron_step(d, d_sae, k, x, "auto", torch.bfloat16)
    steps = 1 if args.dry_run else STEPS
    for _ in range(1 if args.dry_run else 3):
        step()
    common.sync(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        common.sync(dev)
    averages = prof.key_averages()
    sort_key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    text = averages.table(sort_by=sort_key, row_limit=30, max_name_column_width=70)
    rows = []
    for e in averages:
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "self_cuda_time_total", 0.0)
        rows.append({"name": e.key, "device_ms_per_step": device_us / 1e3 / steps,
                     "cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                     "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["device_ms_per_step"])
    result = {"env": common.environment(), "shape": {"d": d, "d_sae": d_sae, "k": k, "B": B},
              "steps": steps, "rows": rows[:60], "table": text}
    common.write_json(args.out, "profile.json", result)
    print(f"== profile: saetron auto, bf16, d={d} d_sae={d_sae} k={k} B={B}, {steps} steps "
          f"(divide totals by {steps})\n{text}", flush=True)
    return result


if __name__ == "__main__":
    main()
