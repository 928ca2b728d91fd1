"""Hugging Face checkpoint I/O: config.json + safetensors (single file or sharded with an index).

Loading streams the files tensor by tensor (`safe_open(...).get_slice`) straight into the model's
parameters, which may be plain tensors, meta tensors (materialised first with `to_empty`) or
FSDP2 / DTensor shards — then each rank reads only the rows of its own shard, so no rank ever
holds a full extra copy of the model, nor even of one tensor. Expert weights are accepted in both
layouts and written into the fused parameters:

  per-expert  model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj}.weight [I, H], .down_proj.weight [H, I]
  fused       model.layers.{i}.mlp.experts.gate_up_proj [E, 2I, H], .down_proj [E, H, I]

Saving writes the per-expert layout by default (what the original Qwen checkpoints, vLLM and
transformers all read), shards of at most 5 GB, an index json, config.json, into a temporary
directory renamed into place at the end, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from golong.config import ConfigError
from golong.logger import ProgressLog
from golong.models.config import ModelConfig
from golong.models.qwen3 import Qwen3ForCausalLM

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")
# files besides the weights that a checkpoint directory carries and a reader (vLLM) needs
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
MAX_SHARD_BYTES = 5 * 10**9
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}  # safetensors dtype -> bytes per element


# ------------------------------------------------------------------------------------ build
def from_config(config: ModelConfig | dict | object, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Qwen3ForCausalLM:
    """Randomly initialised model (transformers' init) from a HF config (dict / path / object)."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg, dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> Qwen3ForCausalLM:
    """Load a HF Qwen3 / Qwen3-MoE checkpoint directory: built on meta, filled tensor by tensor."""
    cfg = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg, dtype=dtype)
    load_weights(model, path, device=device)
    model.source_path = str(path)
    return model


# ------------------------------------------------------------------------------------- load
def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(_read_index(index).values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors checkpoint in {path}")
    return found


def _target(key: str, params: dict[str, nn.Parameter]) -> tuple[str, int | None, int] | None:
    """Checkpoint key -> (parameter name, expert index or None, row offset along the expert's dim 0)."""
    m = _EXPERT_KEY.match(key)
    if m:
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        if proj == "down_proj":
            name = f"{prefix}.down_proj"
            return (name, e, 0) if name in params else None
        fused = f"{prefix}.gate_up_proj"
        if fused not in params:
            return None
        half = params[fused].shape[1] // 2
        return fused, e, 0 if proj == "gate_proj" else half
    return (key, None, 0) if key in params else None


def _local_region(p: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(writable local tensor, the global index region it holds)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        return p.data, tuple(slice(0, n) for n in p.shape)
    if any(type(pl) not in (Shard, Replicate) for pl in p.placements):
        raise NotImplementedError(f"loading into DTensor placements {p.placements} is not supported")
    # private helper, but the one DTensor itself uses to place uneven (torch.chunk-style) shards
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def load_weights(model: Qwen3ForCausalLM, path: str | Path, device: torch.device | str | None = None,
                 strict: bool = True) -> None:
    """Fill `model`'s parameters from the checkpoint at `path`, one tensor (or shard) at a time.

    Parameters still on the meta device are first materialised with `model.to_empty(device)`
    (device default: cuda:current if available, else cpu) — this also works after FSDP2's
    `fully_shard` on a meta model. Values are cast to each parameter's dtype. For DTensor
    parameters (Shard / Replicate placements) each rank reads just its own region of the tensor.
    strict: unknown checkpoint keys and parameters left (partly) unwritten raise. Always: a key found in
    two files raises, and a tied model accepts an lm_head.weight only equal to the embeddings.
    Errors name the key and its file. A load that takes longer than PROGRESS_EVERY_S (golong.logger) logs its
    progress in shards and bytes.
    """
    if any(t.is_meta for t in model.parameters()):
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        model.to_empty(device=device)
    params = dict(model.named_parameters())
    regions = {n: _local_region(p) for n, p in params.items()}
    written = dict.fromkeys(params, 0)
    unknown: list[str] = []
    seen: dict[str, Path] = {}  # checkpoint key -> the file it came from
    tied = model.lm_head is None

    files = checkpoint_files(path)
    progress = ProgressLog(f"loading weights from {path}", len(files), "shards",
                           total_bytes=sum(f.stat().st_size for f in files))
    for file in files:
        walked = 0  # bytes of this file's tensors copied so far (the rest is counted when the file is done)
        with _open_shard(file) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if _IGNORED.search(key):
                    continue
                # a key twice (in two shards) would count twice and could hide a missing one
                if key in seen:
                    raise ConfigError(f"{key} is in both {seen[key].name} and {file.name}")
                seen[key] = file
                if tied and key == "lm_head.weight":
                    continue  # compared with the embeddings once they are loaded
                tgt = _target(key, params)
                if tgt is None:
                    unknown.append(f"{key} ({file.name})")
                    continue
                name, expert, row0 = tgt
                if expert is not None and expert >= params[name].shape[0]:
                    raise ConfigError(f"{key} ({file.name}): expert {expert} does not exist, the config has "
                                     f"{params[name].shape[0]} experts")
                local, region = regions[name]
                src = f.get_slice(key)
                src_shape = tuple(src.get_shape())
                # the global region this key covers, in parameter coordinates
                dims = ([slice(expert, expert + 1)] if expert is not None else []) + [
                    slice(row0, row0 + src_shape[0]), *(slice(0, n) for n in src_shape[1:])]
                full = tuple(params[name].shape)
                # one expert's key fills exactly its slice: all of down_proj[e], half of gate_up_proj[e]
                want = full if expert is None else (full[1] // (2 if name.endswith("gate_up_proj") else 1),
                                                    *full[2:])
                if len(dims) != len(full) or any(d.stop > n for d, n in zip(dims, full)) or src_shape != want:
                    raise ConfigError(f"{key}: shape {src_shape} does not fit parameter {name} {full}"
                                     + (f" (expected {want} per expert)" if expert is not None else "")
                                     + f", in {file.name}")
                lo = [max(d.start, r.start) for d, r in zip(dims, region)]
                hi = [min(d.stop, r.stop) for d, r in zip(dims, region)]
                if any(a >= b for a, b in zip(lo, hi)):
                    continue  # none of this tensor lives on this rank
                src_idx = tuple(slice(a - d.start, b - d.start) for a, b, d in zip(lo, hi, dims))
                dst_idx = tuple(slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region))
                part = src[src_idx[1:]] if expert is not None else src[src_idx]
                part = part.reshape([b - a for a, b in zip(lo, hi)])
                local[dst_idx].copy_(part.to(local.dtype), non_blocking=False)
                written[name] += part.numel()
                nbytes = math.prod(src_shape) * _DTYPE_BYTES.get(src.get_dtype(), 2)
                walked += nbytes
                progress.advance(nbytes)
        progress.advance(file.stat().st_size - walked, items=1)
    progress.close()
    if strict:
        if unknown:
            raise ConfigError(f"{len(unknown)} checkpoint tensors match no parameter, e.g. {unknown[:5]}")
        # distinct keys never overlap (exact shapes, no duplicates) except a fused expert key next to
        # per-expert keys of the same layer: more elements than the parameter holds
        twice = [n for n, c in written.items() if c > regions[n][0].numel()]
        if twice:
            raise ConfigError(f"{len(twice)} parameters are given by both fused and per-expert keys, e.g. {twice[:5]}")
        missing = [k for n, c in written.items() if c < regions[n][0].numel()
                   for k in _missing_keys(n, params[n], seen)]
        if missing:
            where = _weight_map(path)
            named = [f"{k} ({where[k]})" if k in where else k for k in missing[:5]]
            raise ConfigError(f"{len(missing)} checkpoint tensors were not (fully) found in {path}, e.g. {named}")
    if tied and "lm_head.weight" in seen:  # after the strict checks: the embeddings are all loaded
        _check_tied_head(seen["lm_head.weight"], params["model.embed_tokens.weight"],
                         *regions["model.embed_tokens.weight"])


def _weight_map(path: str | Path) -> dict[str, str]:
    """The index's key -> file map ({} for a single-file checkpoint)."""
    index = Path(path) / "model.safetensors.index.json"
    return _read_index(index) if index.exists() else {}


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of a safetensors index file; a damaged one is a ConfigError naming it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{index}: not valid JSON ({e}); an interrupted download?") from None
    except (KeyError, TypeError):
        raise ConfigError(f"{index}: holds no weight_map (the tensor -> file map of a safetensors index)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index}: weight_map must map each tensor name to a file name")
    return weight_map


@contextlib.contextmanager
def _open_shard(file: Path) -> Iterator[Any]:
    """safe_open of a checkpoint file on the CPU; a damaged file (an interrupted download) is a ConfigError naming
    it, not the library's bare message."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ConfigError(f"{file}: not a readable safetensors file ({e}); an interrupted download?") from None


def _missing_keys(name: str, p: torch.Tensor, seen: dict[str, Path]) -> list[str]:
    """Checkpoint keys that would have filled parameter `name` but were not read: the per-expert keys
    of a fused expert parameter (unless its fused key was read), else `name` itself."""
    prefix, proj = name.rsplit(".", 1)
    if not prefix.endswith("mlp.experts") or name in seen:
        return [name]
    projs = ("gate_proj", "up_proj") if proj == "gate_up_proj" else (proj,)
    keys = [f"{prefix}.{e}.{q}.weight" for e in range(p.shape[0]) for q in projs]
    return [k for k in keys if k not in seen] or [name]


def _check_tied_head(file: Path, embed: torch.Tensor, local: torch.Tensor, region: tuple[slice, ...]) -> None:
    """A tied model's checkpoint may also hold lm_head.weight: vLLM ignores it, transformers 5 unties the
    head when it differs from the embeddings. Rather than pick one silently, accept only an equal copy.
    embed: the (possibly DTensor) embedding parameter, local/region: this rank's part of it."""
    from torch.distributed.tensor import DTensor

    with _open_shard(file) as f:
        head = f.get_slice("lm_head.weight")
        same = tuple(head.get_shape()) == tuple(embed.shape) and torch.equal(
            head[region].to(device=local.device, dtype=local.dtype), local)
    differs = torch.tensor(float(not same), device=local.device)
    if isinstance(embed, DTensor) and dist.is_initialized():
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)  # every rank must raise, or the others would hang
    if differs.item():
        raise ConfigError(f"tie_word_embeddings is true but lm_head.weight in {file.name} differs from "
                         "model.embed_tokens.weight (transformers 5 would untie them, vLLM would ignore the head); "
                         "set tie_word_embeddings to false or drop lm_head.weight from the checkpoint")


# ------------------------------------------------------------------------------------- save
def full_parameters(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) per parameter, gathered one at a time (DTensors: full_tensor(), a collective every rank of
    the mesh must join); with `dtype`, each shard is cast before its gather (an fp32 master gathered for a bf16
    engine or file would move twice the bytes)."""
    for name, p in model.named_parameters():
        p = p.detach() if dtype is None else p.detach().to(dtype)
        yield name, p.full_tensor() if hasattr(p, "full_tensor") else p


def hf_state_items(model: nn.Module, expert_layout: str = "per_expert", dtype: torch.dtype | None = None,
                   device: str | None = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, full tensor) pairs, one parameter gathered at a time (see full_parameters), on `device` (None: the
    parameters' own, as an in-memory weight push wants them). per_expert splits the fused experts into the
    per-expert keys of HF checkpoints and vLLM's loaders, as views of the gathered tensor."""
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'fused', got {expert_layout!r}")
    for name, t in full_parameters(model, dtype):
        if device is not None:
            t = t.to(device)
        if expert_layout == "per_expert" and name.endswith("mlp.experts.gate_up_proj"):
            prefix, half = name[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :half]
                yield f"{prefix}.{e}.up_proj.weight", t[e, half:]
        elif expert_layout == "per_expert" and name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def _check_replaceable(path: Path) -> None:
    """Only an earlier export may be replaced: a directory of safetensors weights and the files an export writes
    beside them. Anything else (a run directory, a training checkpoint, a downloaded model with its README and
    LICENSE, unrelated files) raises FileExistsError."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    entries = list(path.iterdir())
    if not entries:
        return
    ours = {"config.json", "model.safetensors.index.json", *_SIDE_FILES}
    foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in entries
                     if not (e.is_file() and (e.suffix == ".safetensors" or e.name in ours)))
    if foreign or not any(e.suffix == ".safetensors" for e in entries):
        names = ", ".join((foreign or sorted(e.name for e in entries))[:8])
        raise FileExistsError(f"{path} is not empty and holds no earlier Hugging Face export ({names}); "
                              "write to a new or empty directory")


def save_pretrained(model: Qwen3ForCausalLM, path: str | Path, *, max_shard_bytes: int = MAX_SHARD_BYTES,
                    expert_layout: str = "per_expert", dtype: torch.dtype | None = None,
                    copy_files_from: str | Path | None = None) -> None:
    """Write a HF checkpoint directory at `path` (an earlier export there is replaced atomically; any other
    non-empty directory is refused).

    Under torch.distributed every rank must call this (DTensor parameters are gathered one at a
    time); rank 0 writes. Tokenizer / generation-config files are copied from `copy_files_from`
    (default: the directory the model was loaded from, if any).
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    _check_replaceable(path)
    if rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:  # the directory asked for, not our temporary one beside it (/proc/.foo.tmp-7622)
            where = f" ({e.filename})" if e.filename and Path(e.filename) not in (path, tmp) else ""
            raise type(e)(f"cannot create {path}: {e.strerror}{where}") from None
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    written: list[tuple[str, dict[str, str]]] = []  # (temp file name, key -> shard index)

    def flush() -> None:
        name = f"shard-{len(written):05d}.safetensors"
        try:
            save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors (a full disk: "os error 28") are no OSError
            if not (code := re.search(r"os error (\d+)", str(e))):
                raise
            raise OSError(int(code.group(1)), f"{os.strerror(int(code.group(1)))} writing {path}") from e
        written.append((name, list(shards[-1])))
        shards[-1], sizes[-1] = {}, 0
        progress.advance(items=1)

    first_dtype = None
    total = 0  # the index's total_size: bytes of the tensors (headers excluded), as transformers writes it
    progress = ProgressLog(f"writing {path}", None, "shards",
                           total_bytes=sum(p.numel() * (dtype or p.dtype).itemsize for p in model.parameters()))
    try:
        for key, t in hf_state_items(model, expert_layout, dtype, device="cpu" if rank == 0 else None):
            first_dtype = first_dtype or t.dtype
            if rank != 0:
                continue
            nbytes = t.numel() * t.element_size()
            total += nbytes
            if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
                flush()
            # a copy: expert slices are views of one tensor, and safetensors refuses shared storage
            shards[-1][key] = t.clone(memory_format=torch.contiguous_format)
            sizes[-1] += nbytes
            progress.advance(nbytes)
        if rank == 0:
            if shards[-1]:
                flush()
            progress.close()
            n = len(written)
            weight_map = {}
            for i, (tmp_name, keys) in enumerate(written):
                final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (tmp / tmp_name).rename(tmp / final)
                weight_map.update(dict.fromkeys(keys, final))
            if n > 1:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            dtype_name = str(first_dtype).removeprefix("torch.") if first_dtype is not None else None
            (tmp / "config.json").write_text(json.dumps(model.config.to_hf(dtype=dtype_name), indent=2))
            # safetensors >= 0.7 writes through a 0600 temporary file: give the weights the mode the umask gives every
            # other file here, or another account (a vLLM server, a colleague) cannot read the export
            mode = (tmp / "config.json").stat().st_mode & 0o777
            for f in tmp.glob("*.safetensors"):
                f.chmod(mode)
            src = copy_files_from or getattr(model, "source_path", None)
            if src is not None:
                for name in _SIDE_FILES:
                    if (Path(src) / name).exists():
                        shutil.copy2(Path(src) / name, tmp / name)
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                path.rename(old)
                try:
                    tmp.rename(path)
                except BaseException:  # the earlier export back where it was
                    old.rename(path)
                    raise
                shutil.rmtree(old)
            else:
                tmp.rename(path)
    except BaseException:
        if rank == 0:  # no hidden shards left behind to fill the disk (a retry would add its own)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
