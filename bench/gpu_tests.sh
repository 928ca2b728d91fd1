#!/usr/bin/env bash
# The GPU correctness tests (pytest -m gpu) as three concurrent pytest processes: most of their time is Triton
# compiling kernel variants on the CPU, while the tests themselves take a fraction of one GPU.
#   bench/gpu_tests.sh OUT_DIR            -> OUT_DIR/gpu_tests_{attention,moe,rest}.xml; exit status: failed groups
#   bench/gpu_tests.sh OUT_DIR --dry-run  the same groups collected (pytest --collect-only), nothing run
set -uo pipefail
[[ $# -eq 1 || ( $# -eq 2 && $2 == --dry-run ) ]] || { echo "usage: $0 OUT_DIR [--dry-run]" >&2; exit 2; }
OUT=$1
COLLECT=()
[[ $# -eq 2 ]] && COLLECT=(--collect-only)
mkdir -p "$OUT"
PY=${PYTHON:-python}
# tests/conftest.py turns the Triton interpreter on where this is unset: on a GPU the real kernels must run
export TRITON_INTERPRET=${TRITON_INTERPRET:-0}
K=tests/kernels
declare -A TEST_SETS=(
  [attention]="$K/test_flash_attention.py $K/test_ring_attention.py"
  [moe]="$K/test_grouped_mm.py $K/test_moe.py"
  [rest]="$K tests/golong/test_model_gpu.py --ignore=$K/test_flash_attention.py --ignore=$K/test_ring_attention.py
          --ignore=$K/test_grouped_mm.py --ignore=$K/test_moe.py"
)
declare -A PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; exit 124' TERM INT  # a step timeout stops every group
for name in "${!TEST_SETS[@]}"; do
  # shellcheck disable=SC2086  # the group's paths and options split on whitespace
  "$PY" -m pytest -q -m gpu -p no:cacheprovider "${COLLECT[@]}" --junitxml "$OUT/gpu_tests_$name.xml" \
    ${TEST_SETS[$name]} \
    > "$OUT/gpu_tests_$name.log" 2>&1 &
  PIDS[$name]=$!
done
failed=0
for name in attention moe rest; do
  if wait "${PIDS[$name]}"; then status=ok; else status=FAILED; failed=$((failed + 1)); fi
  echo "== gpu_tests/$name: $status"
  if [[ ${#COLLECT[@]} -gt 0 ]]; then cat "$OUT/gpu_tests_$name.log"; else tail -n 15 "$OUT/gpu_tests_$name.log"; fi
done
exit $failed
