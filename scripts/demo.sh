#!/usr/bin/env bash
# The CPU demo, from a fresh clone: sets up .venv when needed, then `golong demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec .venv/bin/golong demo "$@"
