#!/usr/bin/env bash
# The test command of README.md: set up .venv (idempotent), check style, run the suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
