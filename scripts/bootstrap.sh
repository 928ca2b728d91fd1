#!/usr/bin/env bash
# Create .venv (once) and install golong with its dev extras. Idempotent and quiet; run by
# scripts/test.sh and scripts/demo.sh. Uses pip + venv (torch first: 2.13.0, or pyproject's range where
# nvidia-smi is found, so the range in pyproject.toml is already satisfied and no other torch build is pulled in).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GOLONG_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.golong-installed"
want="$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[golong] setting up $VENV (first run only; a few minutes)..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch>=2.11,<2.15"
  else
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  fi
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
echo "$want" > "$STAMP"
