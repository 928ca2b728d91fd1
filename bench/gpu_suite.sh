#!/usr/bin/env bash
# The GPU evidence in one command, on a single H100/H200, in under 8 minutes:
#
#   bench/gpu_suite.sh OUT_DIR            # GPU: bf16 correctness tests + every kernel bench vs its peers
#                                         #      + one Qwen3-4B-shaped training step; JSON under OUT_DIR
#   bench/gpu_suite.sh OUT_DIR --dry-run  # CPU: every command resolves (the GPU run's own commands with
#                                         #      --dry-run appended: their flags parse, each script imports
#                                         #      and builds a tiny case; the test groups collected), run
#                                         #      concurrently; nothing measured
#
# Steps (each under its own timeout, 445 s in all with the report, + 2 s kill grace each; STEPS="name ..." runs a subset; a failed or timed-out
# step is recorded and the suite goes on):
#   gpu_tests       bench/gpu_tests.sh: pytest -m gpu, each kernel (logprob, grouped GEMM / MoE, flash
#                   attention) and the model in bf16 on CUDA vs fp32/fp64 references, as three concurrent
#                   pytest processes                                -> OUT_DIR/gpu_tests_*.xml
#   logprob         python -m bench.logprob: Triton vs naive torch, Liger FLCE, CCE at 8K-128K tokens;
#                   peak memory of one step at 1M tokens
#   logprob_configs python -m bench.logprob_configs: forward share and backward layouts at 8K tokens
#   moe_configs     python -m bench.moe_configs: grouped GEMM tile candidates at Qwen3-30B-A3B shapes; the
#                   winner (> 3% faster, checked) goes to OUT_DIR/tuned/<GPU>.json for the later steps
#   moe             python -m bench.moe: MoE MLP / grouped GEMM vs torch._grouped_mm (+ Liger fused MoE);
#                   records GATHER_IN_GEMM in OUT_DIR/tuned
#   attention_configs python -m bench.attention_configs: flash-attention tile / layout candidates and
#                   PyTorch's FA2 kernels as what "auto" runs, vs SDPA; the winner goes to OUT_DIR/tuned
#   attention       python -m bench.attention: flash attention vs FlashAttention-2 (PyTorch's varlen_attn;
#                   flash-attn when installed) and SDPA, 16K-128K tokens, and the ring's schedule replayed on
#                   one GPU (W = 8)
#   profile_kernels python -m bench.profile_kernels: time per CUDA kernel of the MoE MLP, attention, logprob
#   gpu_train_step  python -m bench.gpu_train_step: one policy update of a Qwen3-4B-shaped model, 16K tokens
#   train_step_keep_attention  the same at 12 layers, plain activation checkpointing vs parallel.ac_keep_attention
#   report          python bench/report.py: OUT_DIR/README.md from the JSON files
# OUT_DIR/suite.json lists every step with its command, exit status and seconds. Exit status: the
# number of failed steps (0 = all passed). PYTHON overrides the interpreter (default: .venv/bin/python
# when it exists, else python).
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
DRY=0
if [[ $# -eq 2 ]]; then [[ $2 == --dry-run ]] || usage; DRY=1; fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # before the cd below: a relative OUT_DIR is the caller's
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1 TOKENIZERS_PARALLELISM=false
# the commit every JSON records; set GOLONG_COMMIT where the tree was copied without .git
# (bench.common.git_commit: HEAD, "-dirty" when tracked files differ from it)
GOLONG_COMMIT=${GOLONG_COMMIT:-$("$PYTHON" -c "from bench.common import git_commit; print(git_commit())" 2>/dev/null \
  || echo unknown)}
export GOLONG_COMMIT
# tests/conftest.py defaults the Triton interpreter on; on a GPU the real kernels must run
[[ $DRY -eq 1 ]] || export TRITON_INTERPRET=0
# per-GPU settings the sweeps adopt in this run (kernels/tuned.py reads this directory before kernels/gpu_configs/)
export GOLONG_TUNED_DIR="$OUT/tuned"
LOGS="$OUT/logs"
mkdir -p "$LOGS"

NAMES=() CMDS=() LIMITS=()
step() {  # step NAME TIMEOUT_S COMMAND...: on a dry run the same command with --dry-run appended, under 300 s
  NAMES+=("$1")
  if [[ $DRY -eq 1 ]]; then LIMITS+=(300); else LIMITS+=("$2"); fi
  shift 2
  if [[ $DRY -eq 1 ]]; then CMDS+=("$* --dry-run"); else CMDS+=("$*"); fi
}

# a bench script that takes --out writes there; one that does not writes bench/results/<name>-gpu.json,
# copied to OUT_DIR afterwards
out_flag() { grep -q -- '"--out"' "bench/$1.py" && echo "--out $OUT"; }

if [[ $DRY -eq 0 ]]; then
  "$PYTHON" - <<'EOF' || { echo "gpu_suite: no CUDA device (use --dry-run on CPU)" >&2; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
fi
# the GPU run's steps (limits in seconds); a dry run checks these same commands
step gpu_tests 70 "PYTHON=$PYTHON bash bench/gpu_tests.sh $OUT"
step logprob 70 "$PYTHON -m bench.logprob --iters 3 $(out_flag logprob)"
step logprob_configs 30 "$PYTHON -m bench.logprob_configs --out $OUT"
# the sweeps run before their benches and record their winners in OUT_DIR/tuned (GOLONG_TUNED_DIR), which the
# later steps read: bench.moe, bench.attention, profile_kernels and the train step measure the adopted settings
# (an adopted attention auto_backend reaches the train step only: the attention benches time our kernels by name)
step moe_configs 30 "$PYTHON -m bench.moe_configs --out $OUT --save-tuned $OUT/tuned"
# 10 timed calls per row (not 3): the skewed / uniform forward ratio compares two ~5 ms timings
# (run 6: 0.945x, run 7: 0.856x)
step moe 55 "$PYTHON -m bench.moe --iters 10 --budget-s 40 $(out_flag moe) --save-tuned $OUT/tuned"
# 20 candidates: precompiled in parallel, those not started by --budget-s are listed as skipped
step attention_configs 55 "$PYTHON -m bench.attention_configs --budget-s 45 --out $OUT --save-tuned $OUT/tuned"
step attention 50 "$PYTHON -m bench.attention $(out_flag attention)"
step profile_kernels 15 "$PYTHON -m bench.profile_kernels --out $OUT"
step gpu_train_step 30 "$PYTHON -m bench.gpu_train_step --out $OUT"
step train_step_keep_attention 30 "$PYTHON -m bench.gpu_train_step --keep-attention --layers 12 --iters 2 --out $OUT"

if [[ -n ${STEPS:-} ]]; then  # STEPS="logprob moe": run only these (a rerun inside a short GPU lease)
  keep_n=() keep_c=() keep_l=()
  for i in "${!NAMES[@]}"; do
    if [[ " $STEPS " == *" ${NAMES[$i]} "* ]]; then keep_n+=("${NAMES[$i]}"); keep_c+=("${CMDS[$i]}"); keep_l+=("${LIMITS[$i]}"); fi
  done
  [[ ${#keep_n[@]} -gt 0 ]] || { echo "gpu_suite: STEPS='$STEPS' matches none of: ${NAMES[*]}" >&2; exit 2; }
  NAMES=("${keep_n[@]}") CMDS=("${keep_c[@]}") LIMITS=("${keep_l[@]}")
fi

run_step() {  # run_step INDEX: runs one step, records rc and seconds in files (works in background)
  local i=$1 name=${NAMES[$1]} t0 rc
  t0=$(date +%s)
  rm -f "$OUT/$name-gpu.json"  # a rerun into this OUT_DIR: an earlier run's results never stand for this one's
  touch "$LOGS/$name.start"
  timeout --kill-after=2 "${LIMITS[$i]}" bash -c "${CMDS[$i]}" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" >"$LOGS/$name.status"
}

T0=$(date +%s)
if [[ $DRY -eq 1 ]]; then  # independent CPU checks: run them side by side
  pids=()
  for i in "${!NAMES[@]}"; do run_step "$i" & pids+=($!); done
  wait "${pids[@]}"
else  # one GPU: one step at a time
  for i in "${!NAMES[@]}"; do
    echo "== ${NAMES[$i]}: ${CMDS[$i]}"
    run_step "$i"
    tail -n 40 "$LOGS/${NAMES[$i]}.log"
    name=${NAMES[$i]}
    # written by this step (not left over from an earlier run) to bench/results instead of OUT_DIR
    if [[ ! -f $OUT/$name-gpu.json && bench/results/$name-gpu.json -nt $LOGS/$name.start ]]; then
      cp "bench/results/$name-gpu.json" "$OUT/"
    fi
  done
  step report 10 "$PYTHON bench/report.py --results $OUT --readme $OUT/README.md"
  run_step $(( ${#NAMES[@]} - 1 ))
fi

FAILED=0
JSON="["
for i in "${!NAMES[@]}"; do
  read -r rc secs <"$LOGS/${NAMES[$i]}.status"
  status=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="timed out after ${LIMITS[$i]} s"; elif [[ $rc -ne 0 ]]; then status="failed (exit $rc)"; fi
  [[ $status == ok ]] || FAILED=$((FAILED + 1))
  printf '%-15s %-28s %4s s  %s\n' "${NAMES[$i]}" "$status" "$secs" "${CMDS[$i]}"
  [[ $status == ok ]] || tail -n 15 "$LOGS/${NAMES[$i]}.log" | sed 's/^/    | /'
  cmd=${CMDS[$i]//\\/\\\\}; cmd=${cmd//\"/\\\"}
  JSON+=$'\n'" {\"step\": \"${NAMES[$i]}\", \"command\": \"$cmd\", \"exit\": $rc, \"seconds\": $secs, \"status\": \"$status\"},"
done
JSON="${JSON%,}"$'\n'"]"
MODE=$([[ $DRY -eq 1 ]] && echo dry-run || echo gpu)
printf '{"mode": "%s", "total_seconds": %d, "failed": %d, "steps": %s}\n' "$MODE" $(( $(date +%s) - T0 )) "$FAILED" "$JSON" >"$OUT/suite.json"
echo "gpu_suite ($MODE): $FAILED failed step(s), $(( $(date +%s) - T0 )) s; logs in $LOGS, summary in $OUT/suite.json"
exit "$FAILED"
