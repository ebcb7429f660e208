"""Repeat the 2-rank torchrun scenario of tests/test_train_distributed.py; count the runs that exit rc=0.

    .venv/bin/python scripts/torchrun_loop.py --runs 50

One run = what the test does under torchrun: 2 ranks (gloo on CPU, FSDP2) train 8 steps with
checkpoints, then a second torchrun resumes them to step 16 and exports the SAE. A run passes when
both exit with rc 0. A failed run keeps its folder, with each torchrun's stderr, and its tail is
printed. The exit status is 0 only when every run passed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_train_distributed import FLAGS  # noqa: E402
from train_support import torchrun, write_store  # noqa: E402


def one_run(store: Path, out: Path, nproc: int) -> list[int]:
    """The test's two torchrun invocations into `out`; returns their exit codes."""
    codes = []
    for i, extra in enumerate((["--max_steps", "8", "--checkpoint_every", "4"], ["--resume"])):
        done = torchrun(nproc, store, out, *FLAGS, *extra)
        codes.append(done.returncode)
        if done.returncode != 0:
            (out / f"torchrun_{i}.stderr").write_text(done.stderr)
            print(done.stderr[-2000:], flush=True)
            break
    return codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="torchrun_loop_"))
    store = write_store(root / "store", [2100, 1996], d_model=24)
    failed = []
    for i in range(args.runs):
        out, start = root / f"run_{i:03d}", time.perf_counter()
        codes = one_run(store, out, args.nproc)
        print(f"run {i + 1:3d}/{args.runs}: rc {codes} ({time.perf_counter() - start:.1f} s)", flush=True)
        if any(codes):
            failed.append(i)
        else:
            shutil.rmtree(out)
    kept = f"; failed runs {failed}, kept in {root}" if failed else ""
    print(f"{args.runs - len(failed)} of {args.runs} runs exited rc=0{kept}")
    if not failed:
        shutil.rmtree(root)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
