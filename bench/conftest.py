"""bench/ set-up: the --density-sweep option and the throughput table printed at the end of a run."""

from __future__ import annotations

import sys


def pytest_addoption(parser):
    parser.addoption("--density-sweep", action="store_true", default=False,
                     help="also run the ReLU width sweep behind dispatch.DENSE_WIDTH_THRESHOLD")


def _fmt(value) -> str:
    return f"{value:.2f}x" if isinstance(value, float) else "n/a"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bench = sys.modules.get("bench_step")
    results = getattr(bench, "RESULTS", None)
    if not results:
        return
    write = terminalreporter.write_line
    terminalreporter.section("saetron training-step throughput (same process, best of rounds)")
    for workload in ("topk", "relu"):
        rows = results.get(workload)
        if not rows:
            continue
        shape = next(iter(rows.values()))["shape"]
        write(f"{workload}: {shape}, fp32, {next(iter(rows.values()))['device']}")
        header = f"  {'provider':<10} {'step ms':>9} {'tokens/s':>10} {'(median)':>10} {'(interleaved)':>14}"
        write(header + f" {'L0':>6}")
        for provider, r in rows.items():
            interleaved = r.get("tokens_per_s_interleaved")
            interleaved = f"{interleaved:14,.0f}" if interleaved else f"{'n/a':>14}"
            write(f"  {provider:<10} {r['step_ms']:9.1f} {r['tokens_per_s']:10,.0f} "
                  f"{r['tokens_per_s_median']:10,.0f} {interleaved} {r['l0']:6.1f}")
        ours = rows.get("ours", {})
        ratios = {key: value for key, value in ours.items() if key.startswith("ours/")}
        for interleaved in (False, True):
            line = [f"{key} {_fmt(value)}" for key, value in ratios.items()
                    if key.endswith(" interleaved") == interleaved]
            if line:
                write("  " + " | ".join(line))
    sweep = results.get("density")
    if sweep:
        write("density sweep (ReLU, alternated steps, best of rounds)")
        write(f"  {'b_enc':>6} {'K':>6} {'sparse ms':>9} {'dense ms':>9} {'ratio':>6}")
        for r in sweep.values():
            write(f"  {r['b_enc']:6.2f} {r['width']:6d} {r['sparse_ms']:9.1f} {r['dense_ms']:9.1f} "
                  f"{r['sparse_over_dense']:6.2f}")
