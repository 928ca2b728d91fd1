"""Training checkpoints: DCP-sharded model + optimizer, plus scheduler, sampler, RNG and step.

Layout of one checkpoint (every rank writes its own shard files, rank 0 the rest):

    <dir>/step_000100/
        __0_0.distcp ...        model + optimizer shards (torch.distributed.checkpoint)
        .metadata               DCP index
        trainer_state.pt        step, scheduler, sampler, anything else the trainer adds
        rng_rank{r}.pt          python / numpy / torch RNG states of rank r
        config.json             the model's Hugging Face config (for `golong export`)
        COMPLETE                written last

Atomicity: everything is written into `<dir>/.tmp-step_000100`, the marker last, then the
directory is renamed into place. A run killed at any moment leaves either a complete checkpoint
or a temp directory that resume ignores and the next save removes. Re-saving an existing step (a
run resumed from an earlier checkpoint reaches it again) first moves the old one aside; a run
killed between the two renames is repaired by the next resume or save (the sealed temp directory
is renamed into place). "Newest" means most recently sealed (the marker records when), not the
highest step: a run restarted from scratch or from an earlier step in the same directory resumes
from, and prunes around, its own checkpoints. A pruned checkpoint is renamed aside (`.del-step_*`) before it is
removed, so a kill part way leaves nothing that lists as complete.

A checkpoint directory is input: its pickles are read with torch.load(weights_only=True), and DCP's index
(`.metadata`, a plain pickle DCP unpickles as it is) is checked first to name only DCP's own metadata classes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from golong.config import ConfigError
from golong.logger import ProgressLog, get_logger

log = get_logger()

MARKER = "COMPLETE"
FRESH_OPTIMIZER = "optimizer_fresh"  # trainer_state.pt's record that the optimizer had taken no step yet
EXPORT_READ_BYTES = 2 * 10**9  # golong export reads the checkpoint in parts of about this size (progress lines)
_STEP_DIR = re.compile(r"^step_(\d+)$")


# a failed checkpoint write with less than this left free was for want of space
DISK_FULL_BYTES = 64 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk): what stands instead is in the message."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fault(point: str, step: int) -> None:
    """Test hook: GOLONG_FAULT="ckpt_write@<step>" kills the process at that point of that step's
    checkpoint write (after the shards, before the rename; "ckpt_swap": between setting an old copy of
    the step aside and renaming the new one into place), like a node lost mid-write."""
    spec = os.environ.get("GOLONG_FAULT", "")
    if f"{point}@{step}" in spec.split(","):
        os._exit(17)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _sealed_at(ckpt: Path) -> int:
    """When the checkpoint was sealed (ns): the marker's second line, else its modification time."""
    marker = ckpt / MARKER
    lines = marker.read_text().split()
    return int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else marker.stat().st_mtime_ns


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ckpt_dir, oldest sealed first, as (step, path)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((_sealed_at(p), int(m.group(1)), p))
    return [(step, p) for _, step, p in sorted(found)]


def repair(ckpt_dir: str | Path) -> None:
    """Finish what a killed save left (single process: rank 0): a sealed temp directory whose step has no
    checkpoint is renamed into place; unsealed temp directories and set-aside old copies are removed."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return
    for tmp in root.glob(".tmp-step_*"):
        final = root / tmp.name.removeprefix(".tmp-")
        if (tmp / MARKER).is_file() and not (final / MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for gone in root.glob(".del-step_*"):  # a prune killed part way
        shutil.rmtree(gone, ignore_errors=True)
    for old in root.glob(".old-step_*"):
        final = root / old.name.removeprefix(".old-")
        if (old / MARKER).is_file() and not (final / MARKER).is_file():
            old.rename(final)  # killed before the new copy was sealed: the old one stands
        else:
            shutil.rmtree(old, ignore_errors=True)


def _load_plain(file: Path) -> Any:
    """torch.load of tensors and plain Python values only: a checkpoint directory is input, and unpickling
    arbitrary objects would run whatever code a tampered file names."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file}: holds more than tensors and plain Python values (written by an older golong, "
                         f"or not by golong); refusing to unpickle it: {str(e).splitlines()[0]}") from None
    except (EOFError, RuntimeError, OSError) as e:  # cut or emptied since it was written (a power loss, a copy)
        raise _damaged(file.parent, f"{file.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                       ) from None


# What DCP's index may name: the metadata dataclasses, the file reader's storage records, and the torch and pathlib
# values they hold. Anything else in a `.metadata` file is not DCP's, and unpickling it could run code.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


class _ForeignClass(Exception):
    """A `.metadata` pickle names something outside DCP's metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch.distributed.checkpoint.metadata as dcp_metadata

        obj = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        if isinstance(obj, type) and obj.__module__ == module:  # a class DCP's metadata module defines
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        raise _ForeignClass(f"it names {module}.{name}")


def read_metadata(path: Path) -> Any:
    """DCP's index of checkpoint `path` (its `.metadata`; `__<rank>.metadata` too where a save wrote those),
    unpickled naming DCP's metadata classes only; ConfigError for anything else (a tampered or foreign file: DCP,
    which unpickles it as it is, then never reads it) or a damaged one."""
    index = None
    for file in sorted(path.glob("*.metadata")):
        try:
            with open(file, "rb") as f:
                loaded = _MetadataUnpickler(f).load()
        except _ForeignClass as e:
            raise ConfigError(f"checkpoint {path}: {file.name} is not DCP's index ({e}); refusing to read it (a "
                              "tampered or foreign file)") from None
        except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
            raise _damaged(path, f"{file.name}: {type(e).__name__}: {e}") from None
        if file.name == ".metadata":
            index = loaded
    if index is None:
        raise _damaged(path, "its DCP index .metadata is missing")
    return index


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk: a sealed checkpoint must not come back cut after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is no sealed checkpoint (None when it is): it does not exist, or it has no COMPLETE marker, then
    naming the newest checkpoint inside when it is a run or checkpoints directory (the usual mistake)."""
    p = Path(path)
    if not p.exists():
        return f"{p} does not exist"
    if (p / MARKER).is_file():
        return None
    newest = latest_checkpoint(p) or latest_checkpoint(p / "checkpoints")
    hint = f"; the newest one in it is {newest}" if newest is not None else ""
    if not hint and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        hint = f"; it is a Hugging Face model: give it as model.path={p}"
    return f"{p} is not a complete checkpoint (no {MARKER} marker){hint}"


def rng_state() -> dict[str, Any]:
    """Every generator's state in types torch.load(weights_only=True) reads back: numpy's key array as a tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached),
            "torch": torch.get_rng_state(),
            # this rank's device only: a resume may see fewer devices (one a rank) than the saving process did
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # an older golong saved every visible device's state
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


class Checkpointer:
    """Save every `every` steps, keep the newest `keep_last`, resume from the newest complete one.

    All ranks call save/load (DCP is collective). `trainer_state` is any picklable dict (step,
    scheduler and sampler state_dicts...), written by rank 0 and read by every rank.
    """

    def __init__(self, ckpt_dir: str | Path, every: int = 50, keep_last: int = 2) -> None:
        self.dir = Path(ckpt_dir)
        self.every = every
        self.keep_last = keep_last

    def should_save(self, step: int, last_step: bool = False) -> bool:
        return last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             trainer_state: dict[str, Any], hf_config: dict[str, Any] | None = None,
             extra_files: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoint `step` atomically (collective). `extra_files(tmp_dir)` runs on rank 0
        to add files (e.g. the tokenizer) before the checkpoint is sealed."""
        rank = _rank()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        failure: BaseException | None = None
        if rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                repair(self.dir)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                failure = e
        self._settle(final, tmp, failure)
        # torch's get_state_dict gives an optimizer without state one (a zero-gradient step at lr 0: Adam's step
        # count 1, zero moments); before the first update (the checkpoint after the SFT warm-up's reset) that
        # would change the first update's bias correction. Such an optimizer is saved as it comes and emptied
        # again, here and when the checkpoint is loaded.
        fresh = optimizer is not None and not optimizer.state
        if optimizer is not None:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
        else:
            state = {"model": get_model_state_dict(model)}
        try:
            dcp.save(state, checkpoint_id=str(tmp))
            if fresh:
                optimizer.state.clear()
            torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
            _fsync(tmp / f"rng_rank{rank}.pt")
            if rank == 0:
                torch.save({**trainer_state, FRESH_OPTIMIZER: fresh}, tmp / "trainer_state.pt")
                if hf_config is not None:
                    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
                if extra_files is not None:
                    extra_files(tmp)
                for f in tmp.rglob("*"):  # DCP syncs its own files; the rest, before the marker makes them count
                    if f.is_file() and not f.name.endswith((".distcp", ".metadata")):
                        _fsync(f)
        except (Exception, dcp.api.CheckpointException) as e:  # (DCP's is a BaseException)
            failure = e
        self._settle(final, tmp, failure)
        _fault("ckpt_write", step)
        if rank == 0:
            try:
                # sealed after every checkpoint already there, whatever this node's clock says (a requeued job on
                # a node whose clock is behind): "newest" must be the one written last
                newest = max((_sealed_at(p) for _, p in list_checkpoints(self.dir)), default=0)
                with open(tmp / MARKER, "w") as f:
                    f.write(f"{step}\n{max(time.time_ns(), newest + 1)}\n")
                    f.flush()
                    os.fsync(f.fileno())
                _fsync(tmp)
                old = self.dir / f".old-{final.name}"
                if final.exists():  # re-saving a step: set the old copy aside (atomic), never delete it first
                    shutil.rmtree(old, ignore_errors=True)
                    final.rename(old)
                _fault("ckpt_swap", step)
                tmp.rename(final)
                _fsync(self.dir)
                shutil.rmtree(old, ignore_errors=True)
                self._prune(final)
            except OSError as e:
                failure = e
        self._settle(final, tmp, failure)
        return final

    def _settle(self, final: Path, tmp: Path, failure: BaseException | None) -> None:
        """Collective (a barrier): every rank learns whether any failed writing `final`, and whether for a full disk,
        and all raise alike. DCP and torch.save say a disk is full only as "unexpected pos 704 vs 598" or
        "iostream error" (no errno): the free space, measured on every rank before anything is removed, decides
        too. A full disk is a CheckpointWriteError naming the newest complete checkpoint, the partial copy removed
        (giving the space back); another failure is raised as it came, where it came."""
        if failure is not None:
            cause = _first_cause(failure)
            chain, c = [], cause
            while c is not None and len(chain) < 8:
                chain.append(c)
                c = c.__cause__ or c.__context__
            interrupted = any(isinstance(c, KeyboardInterrupt) for c in chain)
            full = not interrupted and (shutil.disk_usage(self.dir).free < DISK_FULL_BYTES or any(
                getattr(c, "errno", None) == errno.ENOSPC or "No space left on device" in str(c) for c in chain))
        flags = torch.tensor([failure is not None, failure is not None and full], dtype=torch.int32,
                             device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, disk_full = bool(flags[0]), bool(flags[1])
        if not failed:
            return
        if disk_full:
            free = shutil.disk_usage(self.dir).free
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            standing = latest_checkpoint(self.dir)
            what = f" (the error: {type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if failure else \
                " (on another rank)"
            raise CheckpointWriteError(errno.ENOSPC, f"checkpoint {final}: writing it failed, the disk is full "
                                       f"({free / 2**20:.0f} MiB free in {self.dir}); "
                                       + (f"{standing} is the newest complete checkpoint" if standing else
                                          "no complete checkpoint stands") + what) from failure
        if failure is not None:
            raise failure
        raise RuntimeError(f"checkpoint {final}: writing it failed on another rank (its error is in its log)")

    def _prune(self, kept: Path) -> None:
        """Remove the oldest sealed checkpoints beyond keep_last, never `kept` (the one just written): each is
        renamed aside first, so a kill part way leaves no directory that lists as complete."""
        repair(self.dir)  # leftovers of killed writes
        others = [p for _, p in list_checkpoints(self.dir) if p != kept]  # oldest sealed first
        for p in others[: max(0, len(others) - (self.keep_last - 1))]:
            gone = p.with_name(f".del-{p.name}")
            shutil.rmtree(gone, ignore_errors=True)
            p.rename(gone)
            shutil.rmtree(gone, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """'auto' -> newest complete checkpoint (or None), 'none' -> None, else that path."""
        if resume == "none":
            return None
        if resume == "auto":
            # rank 0's choice for all: ranks listing the directory each (an NFS client's stale cache) could differ
            choice = [None]
            if _rank() == 0:
                repair(self.dir)
                choice = [latest_checkpoint(self.dir)]
            if dist.is_available() and dist.is_initialized():
                dist.broadcast_object_list(choice, src=0)
            return choice[0]
        if problem := checkpoint_problem(resume):
            raise FileNotFoundError(problem)
        return Path(resume)

    def load(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
             resume: bool = True) -> dict[str, Any]:
        """Restore model (+ optimizer) in place and this rank's RNG; returns the trainer state. resume=False (golong
        eval): model settings that differ from the checkpoint's (a longer RoPE theta on purpose) are warned of, not
        refused."""
        path = Path(path)
        _check_same_model(path, model, resume)
        if optimizer is not None:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
            with _reading(path):
                dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            state = {"model": get_model_state_dict(model)}
            with _reading(path):
                dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={},
                           options=StateDictOptions(strict=True))
        rng_file = path / f"rng_rank{_rank()}.pt"
        if rng_file.exists():  # absent when resuming on more ranks than wrote the checkpoint
            set_rng_state(_load_plain(rng_file))
        state = _load_plain(path / "trainer_state.pt")
        if state.pop(FRESH_OPTIMIZER, False) and optimizer is not None:
            optimizer.state.clear()  # saved before its first step (Checkpointer.save): as it was then
        return state


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state a checkpoint holds (step, schedule, data order, ...), read without the weights."""
    state = _load_plain(Path(path) / "trainer_state.pt")
    state.pop(FRESH_OPTIMIZER, None)
    return state


def _check_same_model(path: Path, model: nn.Module, resume: bool = True) -> None:
    """Refuse, in one message, a checkpoint written for another architecture (DCP would raise a
    planner traceback about the first mismatching tensor). Reads only the DCP index."""
    saved = {k.removeprefix("model."): m.size for k, m in read_metadata(path).state_dict_metadata.items()
             if k.startswith("model.") and hasattr(m, "size")}
    here = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    problems = [f"{k} is {list(saved[k])} there, {list(here[k])} here"
                for k in here if k in saved and tuple(saved[k]) != here[k]]
    problems += [f"{k} missing there" for k in here if k not in saved]
    problems += [f"{k} unknown here" for k in saved if k not in here]
    if not problems:
        _check_same_computation(path, model, resume)
        return
    msg = f"checkpoint {path} holds a different model than the config: " + "; ".join(problems[:3])
    if len(problems) > 3:
        msg += f" (+{len(problems) - 3} more)"
    cfg_file = path / "config.json"
    if cfg_file.is_file() and hasattr(model, "config"):
        theirs, ours = json.loads(cfg_file.read_text()), model.config.to_hf()
        diff = [f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} here" for k in sorted(set(theirs) | set(ours))
                if k not in ("torch_dtype", "dtype") and theirs.get(k) != ours.get(k)]
        if diff:
            msg += ". Its config.json differs in " + ", ".join(diff)
    raise ConfigError(msg + ". Use the model settings it was written with, or another logging.run_dir for a new "
                     "run.")


# model settings that change what the same tensors compute: a checkpoint written under others is another model
SAME_COMPUTATION = ("model_type", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                    "rope_theta", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")
# ... and those a run may change on purpose (a longer context from here on, with YaRN): warned of
CONTEXT_LENGTH = ("rope_scaling", "max_position_embeddings")


def _check_same_computation(path: Path, model: nn.Module, resume: bool) -> None:
    """Refuse a checkpoint whose config.json differs from the model's in a setting the tensor shapes do not show
    (top-k, norm_topk_prob, RoPE theta, the norm's epsilon ...): resumed, the run would go on as another model; warn
    where it differs in the context length's settings. Evaluated (resume=False), any difference is warned of."""
    cfg_file = path / "config.json"
    if not (cfg_file.is_file() and hasattr(model, "config")):
        return
    from golong.models.config import ModelConfig

    theirs, ours = ModelConfig.from_hf(json.loads(cfg_file.read_text())), model.config

    def differing(keys: tuple[str, ...]) -> list[str]:
        return [f"{k}={getattr(theirs, k)!r} there, {getattr(ours, k)!r} here" for k in keys
                if getattr(theirs, k) != getattr(ours, k)]

    differ = differing(SAME_COMPUTATION)
    if differ and resume:
        raise ConfigError(f"checkpoint {path} holds a different model than the config: its config.json differs in "
                          f"{', '.join(differ)}. Use the model settings it was written with, or another "
                          "logging.run_dir for a new run.")
    differ += differing(CONTEXT_LENGTH)
    if differ:
        log.warning(f"{'resume' if resume else 'eval'}: {path} was written with other model settings than the "
                    f"config's, which {'hold from here on' if resume else 'the eval runs with'}: {', '.join(differ)}")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """DCP's read errors in one line: its CheckpointException is a BaseException (no handler of the CLI's sees it)
    that prints every rank's traceback. A sealed checkpoint fails so when files were removed or cut since (a copy
    of it stopped part way)."""
    try:
        yield
    except dcp.api.CheckpointException as e:
        cause = _first_cause(e)
        raise _damaged(path, f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__) from None


def _first_cause(e: BaseException) -> BaseException:
    """The first failing rank's own error inside DCP's CheckpointException (it holds each rank's (error,
    traceback)); any other error itself."""
    first = next(iter((getattr(e, "failures", None) or {}).values()), None)
    return (first[0] if isinstance(first, tuple) and first else first) or e


def _damaged(path: Path, what: str) -> ConfigError:
    """The error for a sealed checkpoint that no longer reads back, naming the newest other one of its run."""
    others = [p for _, p in list_checkpoints(path.parent) if p != path]  # oldest first
    hint = f"; the newest other checkpoint of its run: {others[-1]} (a run resumes from it with " \
           f"checkpoint.resume={others[-1]}, or with the damaged one moved aside)" if others else ""
    return ConfigError(f"checkpoint {path} is damaged: {what} (it was complete when written; a file was removed or "
                       f"cut since){hint}")


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Convert a training checkpoint into a Hugging Face directory (config.json + safetensors,
    per-expert keys) that transformers and vLLM load. Single process; reads only the model part.
    dtype: e.g. "bfloat16" (default: the dtype recorded in config.json, else float32)."""
    from golong.models import from_config

    ckpt = Path(ckpt_dir)
    if problem := checkpoint_problem(ckpt):
        raise FileNotFoundError(problem)
    read_metadata(ckpt)  # before DCP unpickles it as it is
    hf_config = json.loads((ckpt / "config.json").read_text())
    dtype = dtype or hf_config.get("torch_dtype") or "float32"
    model = from_config(hf_config, dtype=torch.float32, device="cpu")
    # read in parts of about EXPORT_READ_BYTES (DCP reads just the tensors asked for), so that the read, minutes
    # for a 30B checkpoint, can log its progress between them
    params = model.state_dict()
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in params.items():
        if parts[-1] and size + t.nbytes > EXPORT_READ_BYTES:
            parts.append({})
            size = 0
        parts[-1][name] = t
        size += t.nbytes
    progress = ProgressLog(f"export: reading {ckpt}", len(params), "tensors",
                           total_bytes=sum(t.nbytes for t in params.values()))
    with warnings.catch_warnings(), _reading(ckpt):  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        for part in parts:
            dcp.load({"model": part}, checkpoint_id=str(ckpt), no_dist=True)  # in place, into the model's tensors
            progress.advance(sum(t.nbytes for t in part.values()), items=len(part))
    model.load_state_dict({k: v for part in parts for k, v in part.items()})
    progress.close()
    tok_dir = ckpt / "tokenizer"
    model.save_pretrained(out_dir, dtype=getattr(torch, dtype),
                          copy_files_from=tok_dir if tok_dir.is_dir() else None)
    return Path(out_dir)
