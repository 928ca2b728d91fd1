"""bench/: the static kernel report (CI fails on any spill), the GPU suite's dry run, and the results
table generator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report, static_report  # noqa: E402


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


# ------------------------------------------------------------------------------------ static report


def test_static_report_compiles_every_kernel_without_spills(tmp_path):
    """The CI gate: every Triton kernel at its production config compiles for sm_90 with no spills,
    no local memory and shared memory within Hopper's limit."""
    out = subprocess.run([sys.executable, "bench/static_report.py", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    rows = json.loads((tmp_path / "static_report-cpu.json").read_text())["rows"]
    modules = {r["case"].split(".")[0] for r in rows}
    assert {"logprob", "grouped_mm", "flash_attention"} <= modules, out.stdout + out.stderr
    assert all(r["value"] > 0 for r in rows)
    # every matmul kernel stages its tiles in shared memory (elementwise kernels, e.g. logprob_dz_block, need none)
    matmuls = [r for r in rows if r["has_hgmma"]]
    assert len(matmuls) >= 9 and all(r["shared_bytes"] > 0 for r in matmuls), rows
    assert out.returncode == 0, f"static report failed:\n{out.stderr[-3000:]}\n{out.stdout[-6000:]}"


def test_static_report_flags_spills_local_memory_and_shared_memory():
    ok = {"module": "m", "kernel": "k", "registers": 128, "local_bytes": 0, "spill_stores": 0, "spill_loads": 0,
          "shared_bytes": 100_000}
    assert static_report.violations(ok) == []
    assert static_report.violations(ok | {"spill_stores": 8})
    assert static_report.violations(ok | {"spill_loads": 4})
    assert static_report.violations(ok | {"local_bytes": 16})
    assert static_report.violations(ok | {"shared_bytes": 227 * 1024 + 1})
    assert static_report.violations(ok | {"shared_bytes": 227 * 1024}) == []  # Hopper's limit itself is allowed
    assert static_report.violations({"module": "m", "kernel": "k", "error": "boom"})


def test_static_report_requires_the_headline_kernel_modules(monkeypatch):
    monkeypatch.setattr(static_report, "REQUIRED_MODULES", (*static_report.REQUIRED_MODULES, "kernels.not_there"))
    found, problems = static_report.discover()
    assert "kernels.logprob" in found
    assert any("kernels.not_there" in p and "missing" in p for p in problems)


# ----------------------------------------------------------------------------------------- GPU suite


def test_gpu_suite_dry_run_resolves_every_command(tmp_path):
    out = subprocess.run(["bash", "bench/gpu_suite.sh", str(tmp_path), "--dry-run"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    suite = json.loads((tmp_path / "suite.json").read_text())
    steps = {s["step"]: s for s in suite["steps"]}
    assert set(steps) == {"gpu_tests", "logprob", "logprob_configs", "moe", "moe_configs", "attention",
                          "attention_configs", "profile_kernels", "gpu_train_step", "train_step_keep_attention"}
    assert all(s["exit"] == 0 and s["status"] == "ok" for s in steps.values())
    # the GPU run's own commands, flags included, with --dry-run appended (not a list of their own)
    assert all(s["command"].endswith(" --dry-run") for s in steps.values())
    assert "--iters 10 --budget-s 40" in steps["moe"]["command"]
    assert "bench/gpu_tests.sh" in steps["gpu_tests"]["command"]
    assert "--keep-attention --layers 12 --iters 2" in steps["train_step_keep_attention"]["command"]
    # the collected GPU tests cover every kernel and the model
    log = (tmp_path / "logs" / "gpu_tests.log").read_text()
    for name in ("test_logprob", "test_grouped_mm", "test_flash_attention", "test_model_gpu"):
        assert name in log, log[-2000:]


def test_gpu_tests_groups_cover_every_gpu_test(tmp_path):
    """bench/gpu_tests.sh's three concurrent pytest groups together run exactly the GPU tests one pytest would
    (here all skipped: no CUDA), each recorded in its junit file."""
    out = subprocess.run(["bash", "bench/gpu_tests.sh", str(tmp_path)], cwd=ROOT,
                         env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    ran = []
    for group in ("attention", "moe", "rest"):
        xml = (tmp_path / f"gpu_tests_{group}.xml").read_text()
        ran += [f"{c}::{n}" for c, n in re.findall(r'<testcase classname="([^"]+)" name="([^"]+)"', xml)]
    listed = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu", "-p",
                             "no:cacheprovider", "tests/kernels", "tests/golong/test_model_gpu.py"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300).stdout
    expected = [line.replace(".py::", "::").replace("/", ".") for line in listed.splitlines() if "::" in line]
    assert len(ran) == len(set(ran)) and sorted(ran) == sorted(expected) and len(expected) >= 20


def test_gpu_suite_runs_the_steps_named_in_STEPS(tmp_path):
    env = {**_env(), "STEPS": "moe logprob_configs"}
    (tmp_path / "rel").mkdir()  # an earlier run's results there: a rerun's step never leaves them standing for its own
    (tmp_path / "rel" / "moe-gpu.json").write_text('[{"stale": true}]')
    # a relative OUT_DIR is the caller's, not the repository's
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "rel", "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (ROOT / "rel").exists()
    suite = json.loads((tmp_path / "rel" / "suite.json").read_text())
    assert [s["step"] for s in suite["steps"]] == ["logprob_configs", "moe"]  # in the suite's order
    assert not (tmp_path / "rel" / "moe-gpu.json").exists()  # a dry run writes none
    bad = subprocess.run(["bash", "bench/gpu_suite.sh", str(tmp_path / "bad"), "--dry-run"], cwd=ROOT,
                         env={**env, "STEPS": "nope"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "gpu_tests" in bad.stderr  # the valid names are listed


def test_gpu_suite_limits_fit_the_eight_minute_budget():
    # the GPU run's step limits (each may overrun by its kill grace) plus the CUDA probe stay under 8 minutes
    text = (ROOT / "bench" / "gpu_suite.sh").read_text()
    limits = [int(m) for m in re.findall(r"^\s*step \w+ (\d+) ", text, flags=re.M)]
    grace = int(re.search(r"--kill-after=(\d+)", text).group(1))
    assert len(limits) == 11, limits  # ten benches and the report
    assert sum(limits) + grace * len(limits) <= 8 * 60 - 10, (sum(limits), grace)


@pytest.mark.parametrize("script", ["prompts", "model", "trainer_step"])
def test_cpu_bench_scripts_dry_run(script):
    """The CPU-only bench scripts (the GPU suite dry-runs the others) import, parse and run one tiny case."""
    out = subprocess.run([sys.executable, "-m", f"bench.{script}", "--dry-run"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("┘")  # the closing table comes last


def test_shared_prompt_step_dry_run():
    """bench.gpu_train_step --shared-prompt: whole sequences against the prompt packed once, one tiny step each."""
    out = subprocess.run([sys.executable, "-m", "bench.gpu_train_step", "--dry-run", "--shared-prompt", "16"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "shared prompt" in out.stdout and out.stdout.rstrip().endswith("┘")
    bad = subprocess.run([sys.executable, "-m", "bench.gpu_train_step", "--dry-run", "--shared-prompt", "64"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "leaves no prompt in 64-token sequences" in bad.stderr


def test_gpu_suite_rejects_bad_usage(tmp_path):
    out = subprocess.run(["bash", "bench/gpu_suite.sh", str(tmp_path), "--fast"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr


# -------------------------------------------------------------------------------------------- report


def _results(device: str, rows: list[dict]) -> dict:
    return {"bench": "demo", "date": "2026-01-02", "device": device, "commit": "abc1234",
            "command": "demo.py --n 3", "torch": "2.13.0", "rows": rows}


def test_report_writes_the_table_and_keeps_the_hand_written_text(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    cpu_rows = [{"case": "N=4096", "impl": "ours", "metric": "time", "value": 0.123456, "unit": "s",
                 "baseline": "naive", "ratio": 2.5, "ratio_meaning": "peer / ours"},
                {"case": "N=4096", "impl": "naive", "metric": "time", "value": 0.3086, "unit": "s"}]
    (res / "demo-cpu.json").write_text(json.dumps(_results("CPU (Test, 2 threads)", cpu_rows)))
    (res / "demo-gpu.json").write_text(json.dumps(_results("NVIDIA H200", [
        {"case": "N=8192", "impl": "ours", "metric": "TFLOP/s", "value": 612.0, "unit": "TFLOP/s",
         "baseline": "liger", "ratio": 1.7, "note": "bf16 | T=0.7"}])))
    (res / "broken.json").write_text("{not json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nhand-written intro\n\n{report.BEGIN}\nstale\n{report.END}\n\ntrailing notes\n")
    assert report.main(["--results", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "hand-written intro" in text and "trailing notes" in text and "stale" not in text
    # summary: bench, GPU or CPU, date, commit, command; then one table per file
    assert "| demo | CPU | CPU (Test, 2 threads) | 2026-01-02 | `abc1234` | `demo.py --n 3` | 2 |" in text
    assert "| demo | GPU | NVIDIA H200 |" in text
    assert "| N=4096 · ours · time | 0.1235 s | naive | 2.5× (peer / ours) |" in text
    assert "bf16 \\| T=0.7" in text  # pipes inside cells are escaped
    assert text.index("#### demo — CPU") < text.index("#### demo — GPU")
    assert report.main(["--results", str(res), "--readme", str(readme), "--check"]) == 0
    (res / "demo-cpu.json").write_text(json.dumps(_results("CPU (Test, 2 threads)", cpu_rows[:1])))
    assert report.main(["--results", str(res), "--readme", str(readme), "--check"]) == 1


def test_figures_quoted_in_the_readme_are_those_of_their_results_files(tmp_path):
    """The README's prose quotes bench figures by hand (the shared-prompt speed-ups, keep-attention's ratio): each
    is read again from its results file, so a rerun that moves one (or an edit of the text) is caught."""
    import shutil

    assert report.check_claims(ROOT / "bench" / "results") == []
    # the update's seconds are its tokens over tokens/s: 2 x 8 x (2048 + 128) tokens at 6,240.6 tok/s is 5.6 s
    (row,) = [r for r in json.loads((ROOT / "bench/results/trainer_step-cpu.json").read_text())["rows"]
              if r["impl"] == "golong" and r["metric"] == "tokens_per_s"]
    assert f"{2 * 8 * 2176 / row['value']:.1f}" in (ROOT / "README.md").read_text()
    res = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", res)
    moved = json.loads((res / "train_step_shared_prompts-cpu.json").read_text())
    next(r for r in moved["rows"] if r["impl"] == "shared prompt")["ratio"] = 2.5  # a rerun measured another
    (res / "train_step_shared_prompts-cpu.json").write_text(json.dumps(moved))
    (problem,) = report.check_claims(res)
    assert problem == "README.md: no longer says what train_step_shared_prompts-cpu.json gives: 'steps in turn): " \
                      "2.50x faster, for 2.90x fewer rows'"


def test_report_rows_without_value_or_ratio_show_their_measurements():
    """Rows of benches that record named fields (time_s, peak_extra_mib, speedup...) instead of value/ratio, and
    skipped or failed rows, still show what they hold; a results file's tuned settings are printed."""
    row = {"case": "T=4096", "impl": "ours", "time_s": 0.01234, "peak_extra_mib": 1536.0, "tokens_per_s": 123456.7,
           "peak_ok": True, "label": "x", "speedup_vs_naive": 3.14159, "ratio_meaning": "ignored"}
    assert report.figure(row) == "T=4096 · ours"
    assert report.value_str(row) == "time_s=0.01234, peak_extra_mib=1,536, tokens_per_s=123,457"
    assert report.ratio_str(row) == "speedup_vs_naive=3.14×"
    assert report.ratio_str({"ratio": 0.5}) == "0.5×" and report.ratio_str({"ratio": "n/a"}) == "n/a"
    assert report.note_str({"skipped": "no CUDA"}) == "no CUDA" and report.note_str({"error": "OOM"}) == "OOM"
    assert report.note_str({"note": "a", "error": "b"}) == "a" and report.note_str({}) == ""
    d = _results("CPU (Test)", [row, {"case": "big", "impl": "ours", "skipped": "needs CUDA"}])
    text = report.render_file(d | {"tuned": {"B": 1, "A": True}})
    assert "| T=4096 · ours | time_s=0.01234, peak_extra_mib=1,536, tokens_per_s=123,457 |  | " \
           "speedup_vs_naive=3.14× |  |" in text
    assert "| big · ours |  |  |  | needs CUDA |" in text
    assert 'tuned settings: `{"A": true, "B": 1}`' in text
    assert "| (no rows) |" in report.render_file(_results("CPU", []))


def _bench_names() -> dict[str, str]:
    """bench name -> script, from the save_results("name", ...) call of every bench script."""
    names = {}
    for script in sorted((ROOT / "bench").glob("*.py")):
        for m in re.finditer(r"""save_results\(\s*["']([a-z_0-9]+)["']""", script.read_text()):
            names[m.group(1)] = script.name
    return names


def test_readme_holds_the_cpu_results_of_every_bench_script():
    names = _bench_names()
    assert {"logprob", "moe", "attention", "static_report", "gpu_train_step"} <= set(names)
    # written only by CUDA runs (one GPU / torchrun; the *_configs tile sweeps time Triton kernels on the GPU)
    gpu_only = {"gpu_train_step", "attention_ring", "attention_configs", "logprob_configs", "moe_configs"}
    missing = [f"{n} ({names[n]})" for n in sorted(set(names) - gpu_only)
               if not (ROOT / "bench" / "results" / f"{n}-cpu.json").exists()]
    assert not missing, f"no CPU results for: {missing}; run them, then python bench/report.py"
    check = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("value,expect", [(1234567.0, "1.23e+06"), (0.0001234, "0.000123"), (2.0, "2"),
                                          (12345.678, "12,346"), (7, "7"), (None, "—"),
                                          # the boundaries of each format, negative values by magnitude
                                          (1e6, "1e+06"), (999_999.4, "999,999"), (1000.0, "1,000"),
                                          (999.94, "999.9"), (0.001, "0.001"), (0.00099, "0.00099"),
                                          (-1234567.0, "-1.23e+06"), (-0.0001234, "-0.000123"),
                                          (-2500.0, "-2,500"), (0.0, "0"), (1234567, "1,234,567"),
                                          (float("nan"), "NaN"), (True, "True"), ("fused", "fused")])
def test_report_number_format(value, expect):
    assert report.fmt_value(value) == expect


def test_report_shows_profile_kernels_rows():
    # bench.profile_kernels rows have no `value`: their tables read the case name only, every cell empty
    row = {"case": "moe T=32768", "phase": "fwd", "kernel": "_grouped_mm_fwd_kernel", "calls/iter": 2.0,
           "ms/iter": 3.781, "share": 0.715}
    assert report.figure(row) == "moe T=32768 · fwd · _grouped_mm_fwd_kernel"
    assert report.value_str(row) == "calls/iter=2, ms/iter=3.781, share=0.715"


def test_cpu_peak_memory_counts_heap_an_earlier_call_freed():
    """RSS sampling: 80 MiB live at once in 2 MiB blocks that reuse heap pages an earlier call freed (glibc keeps
    them resident) must still count; without trimming the freed heap first the peak read ~0."""
    import torch

    from bench.common import peak_extra_memory

    def work() -> int:
        blocks = [torch.ones(1 << 19) for _ in range(40)]  # 40 x 2 MiB
        return len(blocks)

    a = torch.ones(1 << 20)
    del a  # a freed 4 MiB mmap chunk raises glibc's mmap threshold: 2 MiB blocks now come from the heap
    earlier = [torch.ones(1 << 19) for _ in range(60)]  # an earlier measured call's 120 MiB...
    pin = torch.ones(1 << 16)  # ...below a live block at the heap's top, so free() cannot shrink the heap
    del earlier
    extra, n = peak_extra_memory(work)
    assert n == 40 and extra >= 70 * 2**20, f"peak extra {extra / 2**20:.1f} MiB for 80 MiB live"
    del pin


def test_git_commit_marks_a_tree_that_differs_from_head(tmp_path, monkeypatch):
    """The commit a results file records: HEAD, "-dirty" when tracked code differs from it; a run's own results
    files (bench/results) do not count."""
    from bench.common import git_commit

    monkeypatch.delenv("GOLONG_COMMIT", raising=False)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
                               *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "kernel.py").write_text("TILE = 64\n")
    (tmp_path / "bench" / "results" / "demo-cpu.json").write_text("{}")
    git("add", ".")
    git("commit", "-qm", "c")
    head = git("rev-parse", "--short", "HEAD")
    assert git_commit(tmp_path / "bench") == head
    (tmp_path / "bench" / "results" / "demo-cpu.json").write_text('{"rows": []}')  # written by the run itself
    assert git_commit(tmp_path / "bench") == head
    (tmp_path / "kernel.py").write_text("TILE = 128\n")  # the code measured is not HEAD's
    assert git_commit(tmp_path / "bench") == f"{head}-dirty"


# ------------------------------------------------------------------------------------ tuned settings


def test_bench_moe_records_the_faster_gate_up_settings(tmp_path, monkeypatch):
    """bench.moe --save-tuned: each setting flips from its built-in default only when the flipped row is > 3%
    faster with the same results (here the torch backend, whose results do not depend on the flags)."""
    import torch

    from bench import moe

    monkeypatch.setattr("bench.common.device_name", lambda: "NVIDIA H200")  # the file is named after the GPU
    x = torch.randn(16, 8, requires_grad=True)
    gate_up = torch.randn(4, 12, 8, requires_grad=True)
    down = torch.randn(4, 8, 6, requires_grad=True)
    logits = torch.randn(16, 4)
    fn = lambda: moe.ours_moe(x, logits, 2, gate_up, down, backend="torch")  # noqa: E731
    active = {"GATHER_IN_GEMM": False, "SWIGLU_IN_GEMM": True}  # the built-in defaults in use
    rows = [{"case": "moe_mlp/uniform", "mode": "fwd+bwd", "impl": impl, "ms": ms} for impl, ms in
            (("ours_triton", 10.0), ("ours_triton_gather", 9.0), ("ours_triton_swiglu_kernel", 9.8))]
    moe._save_choices(rows, active, fn, [x, gate_up, down], torch.randn(16, 8), str(tmp_path))
    saved = json.loads((tmp_path / "NVIDIA_H200.json").read_text())["moe_mlp"]
    # gather 10% faster: on; the unfused SwiGLU only 2% faster: the default (fused) stays
    assert saved["values"] == {"GATHER_IN_GEMM": True, "SWIGLU_IN_GEMM": True}
    assert saved["measured"]["GATHER_IN_GEMM"]["on ms"] == 9.0 and saved["measured"]["SWIGLU_IN_GEMM"]["on ms"] == 10.0


def test_bench_moe_never_adopts_a_setting_that_changes_the_results(tmp_path, monkeypatch):
    """A faster flipped setting is adopted only if its output and gradients match the setting in use."""
    import torch

    import kernels.moe_mlp as moe_mlp
    from bench import moe

    monkeypatch.setattr("bench.common.device_name", lambda: "NVIDIA H200")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 5, generator=g, requires_grad=True)
    x = torch.randn(9, 7, generator=g)

    def fn():  # a stand-in whose gathered path is broken (scales by 1.5); SWIGLU_IN_GEMM changes nothing
        return x @ (w * (1.5 if moe_mlp.GATHER_IN_GEMM else 1.0))

    rows = [{"case": "moe_mlp/uniform", "mode": "fwd+bwd", "impl": impl, "ms": ms} for impl, ms in
            (("ours_triton", 10.0), ("ours_triton_gather", 5.0), ("ours_triton_swiglu_kernel", 8.0))]
    before = (moe_mlp.GATHER_IN_GEMM, moe_mlp.SWIGLU_IN_GEMM)
    moe._save_choices(rows, {"GATHER_IN_GEMM": False, "SWIGLU_IN_GEMM": True}, fn, [w],
                      torch.randn(9, 5, generator=g), str(tmp_path))
    saved = json.loads((tmp_path / "NVIDIA_H200.json").read_text())["moe_mlp"]
    assert saved["values"] == {"GATHER_IN_GEMM": False, "SWIGLU_IN_GEMM": False}  # 2x faster but wrong: refused
    assert float(saved["measured"]["GATHER_IN_GEMM"]["rel err"]) == pytest.approx(0.5, rel=1e-2)
    assert float(saved["measured"]["SWIGLU_IN_GEMM"]["rel err"]) == 0.0
    assert (moe_mlp.GATHER_IN_GEMM, moe_mlp.SWIGLU_IN_GEMM) == before  # the module's flags are restored


def test_the_logprob_bench_fails_when_our_kernel_fails(tmp_path, monkeypatch):
    """A peer that cannot run is its error row; our own kernel failing (or a correctness row not ok) fails the
    bench, so gpu_suite's step is not "ok" over an error row (the rows are still written)."""
    import kernels
    from bench import logprob

    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(kernels, "linear_logprob_entropy", broken)
    monkeypatch.setattr(logprob, "H", 64)  # the bench's real shapes take a minute and 4 GB here
    monkeypatch.setattr(logprob, "V", 1000)
    monkeypatch.setattr(sys, "argv", ["logprob", "--n", "64", "--impls", "ours_torch", "naive", "--out",
                                      str(tmp_path)])
    with pytest.raises(SystemExit, match="1 of our rows failed: N=64 ours_torch: RuntimeError: kernel launch failed"):
        logprob.main()
    rows = json.loads((tmp_path / "logprob-cpu.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["impl"] for r in rows} == {"ours_torch", "naive"} and "time_s" in next(r for r in rows
                                                                                      if r["impl"] == "naive")


def test_the_ring_memory_ratio_is_against_one_rank(monkeypatch):
    """Worlds listed without 1: W=1 is measured first anyway, so every row's ratio is against it as it says (the
    first world listed stood in for it)."""
    from bench import attention

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # as ring_cpu_rows sets it: restored after this test
    rows = attention.ring_cpu_rows([40, 9, 23], [2], (2, 1, 8))
    mem = [r for r in rows if r["metric"] == "peak extra memory / rank (max)"]
    assert [r["case"].split()[1] for r in mem] == ["W=1", "W=2"]
    assert mem[1]["baseline_value"] == mem[0]["value"] and mem[1]["ratio"] == pytest.approx(
        mem[1]["value"] / mem[0]["value"])
