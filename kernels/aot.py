"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90) on a machine without a GPU.

`triton.compile` with a CUDA `GPUTarget` runs the whole pipeline (TTIR -> TTGIR -> LLIR -> PTX ->
cubin via the bundled ptxas) without touching a driver. The cubin's resource usage and SASS are
then read with the `cuobjdump` that ships inside the triton wheel. This is how CPU-only CI checks
that a kernel has no register spills, fits in shared memory, and uses wgmma (HGMMA) tensor cores.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOPPER_MAX_SHARED_BYTES = 227 * 1024  # opt-in dynamic shared memory per block on sm_90


@dataclass
class KernelResources:
    """What the sm_90 cubin of one specialised kernel uses."""

    name: str
    registers: int
    local_bytes: int  # per-thread local memory (STACK + LOCAL); > 0 means spills or stack arrays
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # static + dynamic shared memory Triton requests
    num_warps: int
    sass_histogram: dict[str, int] = field(default_factory=dict)

    @property
    def has_hgmma(self) -> bool:
        return any(op.startswith("HGMMA") for op in self.sass_histogram)

    @property
    def fits_hopper_smem(self) -> bool:
        return self.shared_bytes <= HOPPER_MAX_SHARED_BYTES

    def matrix_mix(self) -> dict[str, int]:
        """Counts of tensor-core instructions (HGMMA = wgmma, HMMA = mma.sync)."""
        return {k: v for k, v in self.sass_histogram.items() if k.startswith(("HGMMA", "HMMA", "IMMA"))}


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this triton wheel does not ship {name}")
    return str(path)


def compile_sm90(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any] | None = None,
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: tuple[str, ...] | list[str] = (),
) -> Any:
    """Compile a `@triton.jit` function for sm_90 without a GPU.

    signature maps every non-constexpr argument name to a Triton type ("*fp32", "*bf16", "i32",
    "fp32", ...); constexprs maps constexpr argument names to values. divisible_by_16 names the
    pointer / integer args the JIT would mark 16-divisible at run time (aligned tensors, strides
    and sizes that are multiples of 16): without it the compile sees no alignment and can neither
    vectorise nor pipeline (cp.async) the loads. Returns the CompiledKernel.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _interpreting():
        raise RuntimeError("compile_sm90 cannot run under TRITON_INTERPRET=1; use report(), which re-runs in a child")
    constexprs = dict(constexprs or {})
    full_sig = dict(signature)
    for k in constexprs:
        full_sig.setdefault(k, "constexpr")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    src = ASTSource(fn=fn, signature=full_sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def inspect_cubin(compiled: Any) -> KernelResources:
    """Read registers, local memory, spills, shared memory and the SASS opcode histogram."""
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        cuobjdump = _tool("cuobjdump")
        res = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    m = _RES_RE.search(res)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump resource usage:\n{res}")
    regs, stack, static_shared, local = (int(x) for x in m.groups())
    hist: collections.Counter[str] = collections.Counter()
    for line in sass.splitlines():
        # e.g. "        /*0250*/                   HGMMA.64x128x16.F32 gdesc[UR4], RZ, !UPT ;"
        mm = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", line)
        if mm:
            hist[mm.group(1).split(".")[0] if not mm.group(1).startswith("HGMMA") else _hgmma_key(mm.group(1))] += 1
    spill_st, spill_ld = _ptxas_spills(compiled)
    meta = compiled.metadata
    return KernelResources(
        name=meta.name,
        registers=regs,
        local_bytes=stack + local,
        spill_stores=spill_st,
        spill_loads=spill_ld,
        shared_bytes=max(int(meta.shared), static_shared),
        num_warps=int(meta.num_warps),
        sass_histogram=dict(hist),
    )


def _hgmma_key(op: str) -> str:
    # keep shape and accumulate type: HGMMA.64x128x16.F32(.BF16) -> "HGMMA.64x128x16"
    parts = op.split(".")
    return ".".join(parts[:2])


def _ptxas_spills(compiled: Any) -> tuple[int, int]:
    """Spill stores/loads in bytes, from ptxas -v on the kernel's PTX."""
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.ptx"
        p.write_text(ptx)
        out = subprocess.run(
            [_tool("ptxas"), "-v", "--gpu-name=sm_90a", str(p), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    text = out.stdout + out.stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def report(
    fn: Any, signature: dict[str, str], constexprs: dict[str, Any] | None = None, **opts: Any
) -> KernelResources:
    """compile_sm90 + inspect_cubin in one call.

    The interpreter patches triton.language process-wide, so under TRITON_INTERPRET=1 (kernel tests)
    the compile runs in a child process without it; the kernel is found there by module and name.
    """
    if not _interpreting():
        return inspect_cubin(compile_sm90(fn, signature, constexprs, **opts))
    return reports([{"name": "kernel", "fn": fn, "signature": signature, "constexprs": constexprs or {},
                     **opts}])["kernel"]


_ENTRY_KEYS = ("name", "fn", "signature", "constexprs")  # the rest of an entry: compile options


def reports(entries: list[dict[str, Any]]) -> dict[str, KernelResources]:
    """report() for AOT_CONFIGS-style entries ({"name", "fn", "signature", "constexprs", "num_warps",
    "num_stages", "divisible_by_16"}), keyed by name. Identical compiles run once; under the interpreter all
    of them run in ONE child process (one torch/triton import instead of one per kernel)."""
    jobs = [{"key": e["name"], "module": getattr(e["fn"], "fn", e["fn"]).__module__,
             "name": getattr(e["fn"], "fn", e["fn"]).__name__, "signature": e["signature"],
             "constexprs": e.get("constexprs", {}), "opts": {k: v for k, v in e.items() if k not in _ENTRY_KEYS}}
            for e in entries]
    if _interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*sys.path, env.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, "-m", "kernels.aot"], input=json.dumps(jobs), capture_output=True,
                             text=True, env=env)
        if out.returncode != 0:
            names = sorted({f"{j['module']}.{j['name']}" for j in jobs})
            raise RuntimeError(f"sm_90 compile of {', '.join(names)} failed:\n{out.stderr[-4000:]}")
        return {k: KernelResources(**v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    return _run_jobs(jobs)


def _run_jobs(jobs: list[dict[str, Any]]) -> dict[str, KernelResources]:
    done: dict[str, KernelResources] = {}
    out = {}
    for j in jobs:
        same = json.dumps([j["module"], j["name"], j["signature"], j["constexprs"], j["opts"]], sort_keys=True)
        if same not in done:
            fn = getattr(importlib.import_module(j["module"]), j["name"])
            done[same] = report(fn, j["signature"], j["constexprs"], **j["opts"])
        out[j["key"]] = done[same]
    return out


if __name__ == "__main__":  # the child process of reports()
    print(json.dumps({k: dataclasses.asdict(r) for k, r in _run_jobs(json.loads(sys.stdin.read())).items()}))
