"""Per-GPU launch settings chosen by the bench/*_configs.py sweeps, kept as JSON files named after the GPU.

kernels/gpu_configs/<GPU name>.json (e.g. NVIDIA_H200.json) holds, per kernel module, the settings that differ from
the module's built-in defaults on that GPU, and how they were measured:

    {"flash_attention": {"values": {"split_dv_stages": 2},
                         "measured": {"commit": "...", "date": "...", "time / default": 0.94, ...}}}

A module reads its section at launch time on CUDA tensors (CPU and the interpreter never use tuned settings).
GOLONG_TUNED_DIR, a directory, is searched before kernels/gpu_configs/: a sweep writes there with --save-tuned
(bench/gpu_suite.sh: OUT_DIR/tuned, so the later steps of the same run use the winners). GOLONG_TUNED=0 turns
tuned settings off (the sweeps themselves measure against the built-in defaults).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

DIR = Path(__file__).with_name("gpu_configs")


def file_name(gpu_name: str) -> str:
    """'NVIDIA H200' -> 'NVIDIA_H200.json'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", gpu_name).strip("_") + ".json"


@functools.cache
def gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _dirs() -> list[Path]:
    extra = os.environ.get("GOLONG_TUNED_DIR")
    return ([Path(extra)] if extra else []) + [DIR]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(data, dict) or not all(isinstance(s, dict) and isinstance(s.get("values", {}), dict)
                                             for s in data.values()):
        raise ValueError(f"{path}: expected {{module: {{'values': {{...}}, 'measured': {{...}}}}}}")
    return data


_SECTIONS: dict[tuple[str, ...], dict[str, tuple[dict[str, Any], Path]]] = {}


def _sections(gpu: str) -> dict[str, tuple[dict[str, Any], Path]]:
    """module -> (values, file) on GPU `gpu`, a directory's section replacing the same module's section of the
    directories after it. Read once per process and environment (kernels ask at every launch); save() drops
    the cache, and a file edited by hand reaches the processes started afterwards (or this one after reload())."""
    key = (gpu, os.environ.get("GOLONG_TUNED", "1"), os.environ.get("GOLONG_TUNED_DIR", ""), str(DIR))
    if key not in _SECTIONS:
        found: dict[str, tuple[dict[str, Any], Path]] = {}
        if key[1] != "0":
            for d in reversed(_dirs()):
                path = d / file_name(gpu)
                if path.is_file():
                    found.update({m: (dict(sec.get("values", {})), path) for m, sec in _read(path).items()})
        _SECTIONS[key] = found
    return _SECTIONS[key]


def reload() -> None:
    """Forget the files read so far (the next launch reads them again)."""
    _SECTIONS.clear()


def lookup(module: str, gpu: str) -> tuple[dict[str, Any], Path | None]:
    """(values, file) of `module`'s section for GPU `gpu`; ({}, None) when no file has one or GOLONG_TUNED=0."""
    values, path = _sections(gpu).get(module, ({}, None))
    return dict(values), path


def in_use(gpu: str) -> dict[str, dict[str, Any]]:
    """Every module's tuned settings on GPU `gpu` as the kernels resolve them: what a benchmark ran with."""
    return {m: dict(v) for m, (v, _) in _sections(gpu).items()}


def values(module: str, device: torch.device, valid: list[str]) -> dict[str, Any]:
    """`module`'s tuned settings for the GPU of a CUDA device ({} elsewhere). ValueError, naming the file and
    the valid names, for a setting not in `valid`."""
    if device.type != "cuda":
        return {}
    found, path = lookup(module, gpu_name(device.index if device.index is not None else torch.cuda.current_device()))
    bad = sorted(set(found) - set(valid))
    if bad:
        raise ValueError(f"{path}: [{module}] has unknown settings {bad}; valid: {sorted(valid)}")
    return found


def save(module: str, new_values: dict[str, Any], measured: dict[str, Any], gpu: str, directory: str | Path) -> Path:
    """Write (or replace) `module`'s section of directory/<gpu>.json; other modules' sections are kept."""
    path = Path(directory) / file_name(gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read(path) if path.is_file() else {}
    data[module] = {"values": new_values, "measured": measured}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    reload()
    return path


def pick(times: dict[str, float], ok: dict[str, bool], default: str, margin: float = 0.03) -> str:
    """The candidate to adopt: the fastest that passed its check when it beats `default`'s time by more than
    `margin` (run-to-run noise on these GPUs is a few per cent), else `default`."""
    passed = [(t, name) for name, t in times.items() if ok.get(name, False) and name != default]
    if not passed:
        return default
    t, name = min(passed)
    return name if t < (1.0 - margin) * times[default] else default
