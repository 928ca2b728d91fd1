"""Static resource report of every Triton kernel, compiled ahead of time for Hopper (sm_90) on CPU.

    python bench/static_report.py [--jobs 2] [--out DIR]

Every kernels/ module that holds Triton kernels exposes `AOT_CONFIGS`: a list of dicts
{"name", "fn", "signature", "constexprs", "num_warps", "num_stages", ...} describing each kernel at
its production block configuration (extra keys such as "divisible_by_16" are passed on to
kernels.aot.report). Each one is compiled for sm_90 with the ptxas/cuobjdump inside the triton
wheel, and we print registers, spills, local memory, shared memory and the tensor-core
instruction mix. Exit status 1 on any spill or local memory, shared memory over Hopper's 227 KiB,
a failed compile, a module that has Triton kernels but no AOT_CONFIGS, or a missing required
module — so CI fails on any of them (tests/test_bench.py runs this script).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import importlib
import multiprocessing as mp
import os
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, save_results  # noqa: E402  (after the sys.path fix above)

# Modules whose kernels are the project's headline ops: their absence is an error, not a skip.
REQUIRED_MODULES = ("kernels.logprob", "kernels.grouped_mm", "kernels.flash_attention")
# Not kernel modules: the AOT helper itself and the package's lazy export table.
NOT_KERNEL_MODULES = ("kernels.aot",)
_META_KEYS = ("name", "fn", "signature", "constexprs")


def discover() -> tuple[dict[str, list[str]], list[str]]:
    """{module: [config names]} for every kernels module with AOT_CONFIGS, and a list of problems."""
    import triton

    import kernels

    found: dict[str, list[str]] = {}
    problems: list[str] = []
    names = sorted(f"kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__) if not m.ispkg)
    for mod_name in sorted(set(names) | set(REQUIRED_MODULES)):
        if mod_name in NOT_KERNEL_MODULES:
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                if mod_name in REQUIRED_MODULES:
                    problems.append(f"{mod_name}: required kernel module is missing")
                continue
            problems.append(f"{mod_name}: import failed: {e}")
            continue
        except Exception as e:  # a broken module must fail the report, not vanish from it
            problems.append(f"{mod_name}: import failed: {type(e).__name__}: {e}")
            continue
        configs = getattr(mod, "AOT_CONFIGS", None)
        jitted = [k for k, v in vars(mod).items() if isinstance(v, _jit_types(triton))
                  and getattr(getattr(v, "fn", v), "__module__", mod_name) == mod_name]
        if configs is None:
            if jitted or mod_name in REQUIRED_MODULES:
                problems.append(f"{mod_name}: has Triton kernels {jitted} but no AOT_CONFIGS")
            continue
        if not configs:
            problems.append(f"{mod_name}: AOT_CONFIGS is empty")
            continue
        cfg_names = [c["name"] for c in configs]
        if len(set(cfg_names)) != len(cfg_names):
            problems.append(f"{mod_name}: duplicate AOT_CONFIGS names {cfg_names}")
        found[mod_name] = cfg_names
    return found, problems


def _jit_types(triton: Any) -> tuple[type, ...]:
    """@triton.jit objects: JITFunction, or InterpretedFunction under TRITON_INTERPRET=1."""
    types: list[type] = [triton.runtime.JITFunction]
    interp = getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None)
    if isinstance(interp, type):
        types.append(interp)
    return tuple(types)


def compile_one(mod_name: str, cfg_name: str) -> dict[str, Any]:
    """Compile one AOT config (runs in a worker process) -> resources as a dict, or an error."""
    from kernels.aot import report

    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(mod_name)
        cfg = next(c for c in mod.AOT_CONFIGS if c["name"] == cfg_name)
        opts = {k: v for k, v in cfg.items() if k not in _META_KEYS}
        res = report(cfg["fn"], cfg["signature"], cfg.get("constexprs", {}), **opts)
    except Exception as e:
        return {"module": mod_name, "kernel": cfg_name, "error": f"{type(e).__name__}: {str(e)[-2000:]}",
                "compile_s": time.perf_counter() - t0}
    d = dataclasses.asdict(res)
    d.update(module=mod_name, kernel=cfg_name, matrix_mix=res.matrix_mix(), has_hgmma=res.has_hgmma,
             fits_hopper_smem=res.fits_hopper_smem, compile_s=time.perf_counter() - t0)
    d.pop("sass_histogram")
    return d


def violations(r: dict[str, Any]) -> list[str]:
    from kernels.aot import HOPPER_MAX_SHARED_BYTES

    if "error" in r:
        return [f"compile failed: {r['error']}"]
    out = []
    if r["spill_stores"] or r["spill_loads"]:
        out.append(f"register spills ({r['spill_stores']} B stored, {r['spill_loads']} B loaded)")
    if r["local_bytes"]:
        out.append(f"{r['local_bytes']} B of local memory per thread")
    if r["shared_bytes"] > HOPPER_MAX_SHARED_BYTES:
        out.append(f"shared memory {r['shared_bytes']} B > Hopper's {HOPPER_MAX_SHARED_BYTES} B")
    return out


def _mix_str(mix: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(mix.items())) or "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    ap.add_argument("--out", default=None, help="results directory (default: bench/results)")
    ap.add_argument("--modules", default=None, help="comma-separated subset of kernel modules (default: all)")
    args = ap.parse_args(argv)
    # The interpreter patches triton.language process-wide; the AOT compile needs the real compiler.
    # Drop it before anything imports triton here and before the workers are spawned (tests run
    # this script with TRITON_INTERPRET=1 in the environment).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default (and silences a warning)

    t0 = time.perf_counter()
    found, problems = discover()
    if args.modules:
        keep = {m if m.startswith("kernels.") else f"kernels.{m}" for m in args.modules.split(",")}
        found = {m: v for m, v in found.items() if m in keep}
        problems = [p for p in problems if p.split(":")[0] in keep]
    jobs = [(m, n) for m, names in found.items() for n in names]
    results: list[dict[str, Any]] = []
    # spawn: a forked child would inherit this process's triton/torch state (and threads)
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=mp.get_context("spawn")) as pool:
        futs = [pool.submit(compile_one, m, n) for m, n in jobs]
        results = [f.result() for f in futs]

    rows, table = [], []
    for r in results:
        bad = violations(r)
        problems += [f"{r['module']}.{r['kernel']}: {b}" for b in bad]
        if "error" in r:
            table.append({"kernel": f"{r['module'].split('.')[-1]}.{r['kernel']}", "status": "COMPILE FAILED"})
            continue
        mix = _mix_str(r["matrix_mix"])
        note = (f"spills {r['spill_stores'] + r['spill_loads']} B, local {r['local_bytes']} B, "
                f"smem {r['shared_bytes'] / 1024:.1f} KiB, {r['num_warps']} warps, matrix: {mix}")
        rows.append({"case": f"{r['module'].split('.')[-1]}.{r['kernel']}", "impl": "triton sm_90 (AOT)",
                     "metric": "registers", "value": r["registers"], "unit": "regs/thread",
                     "spill_bytes": r["spill_stores"] + r["spill_loads"], "local_bytes": r["local_bytes"],
                     "shared_bytes": r["shared_bytes"], "num_warps": r["num_warps"], "matrix_mix": r["matrix_mix"],
                     "has_hgmma": r["has_hgmma"], "ok": not bad,
                     "note": ("OK: " if not bad else "FAIL: ") + note})
        table.append({"kernel": rows[-1]["case"], "regs": r["registers"],
                      "spill B": r["spill_stores"] + r["spill_loads"], "local B": r["local_bytes"],
                      "smem KiB": round(r["shared_bytes"] / 1024, 1), "warps": r["num_warps"],
                      "matrix mix": mix, "status": "OK" if not bad else "FAIL: " + "; ".join(bad),
                      "compile s": round(r["compile_s"], 1)})
    path = save_results("static_report", rows, args.out)
    print(f"wrote {path} ({len(rows)} kernels in {time.perf_counter() - t0:.0f} s)")
    for p in problems:
        print(f"ERROR: {p}", file=sys.stderr)
    print_table("Triton kernels compiled for sm_90 (H100/H200) at production configs", table)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
