"""Training checkpoints: round trip of model / optimizer / RNG / trainer state, atomic sealing,
keep-last-K pruning, resume picking the newest complete one, and the HF export."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from golong.build import scratch_hf_config
from golong.checkpoint import (
    MARKER,
    Checkpointer,
    export_hf,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
)
from golong.config import ConfigError
from golong.models import from_config
from tests.golong.trainer_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_config,
)


def _model_and_opt(seed: int = 0):
    cfg = tiny_config()
    torch.manual_seed(seed)
    model = from_config(scratch_hf_config(cfg), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train_a_bit(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (23,), generator=g)
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    lp, _ = model(ids, cu, targets=ids.roll(-1))
    (-lp.mean()).backward()
    opt.step()
    opt.zero_grad()


def test_roundtrip_prune_and_latest(tmp_path):
    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", every=1, keep_last=2)
    saved = {}
    for step in (1, 2, 3):
        _train_a_bit(model, opt, step)
        ck.save(step, model, opt, {"step": step, "sampler": {"position": 10 * step}},
                hf_config=model.config.to_hf(dtype="float32"))
        saved[step] = ({k: v.clone() for k, v in model.state_dict().items()},
                       {k: v["exp_avg_sq"].clone() for k, v in opt.state_dict()["state"].items()},
                       (torch.rand(3), random.random(), np.random.rand()))  # first draws after the save
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [2, 3]  # keep_last=2
    # a write killed before sealing leaves a temp dir and an unsealed step dir: both are ignored
    (tmp_path / "ck" / ".tmp-step_000004").mkdir()
    (tmp_path / "ck" / "step_000005").mkdir()
    assert latest_checkpoint(tmp_path / "ck") == tmp_path / "ck" / "step_000003"
    assert ck.resolve("auto") == tmp_path / "ck" / "step_000003" and ck.resolve("none") is None

    fresh, fresh_opt = _model_and_opt(seed=1)  # different weights, empty optimizer
    _train_a_bit(fresh, fresh_opt, 99)
    state = ck.load(tmp_path / "ck" / "step_000002", fresh, fresh_opt)
    assert state["step"] == 2 and state["sampler"] == {"position": 20}
    for k, v in saved[2][0].items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for k, v in saved[2][1].items():
        assert torch.equal(fresh_opt.state_dict()["state"][k]["exp_avg_sq"], v)
    # torch's, Python's and numpy's generators are back where they were when step 2 was written
    draws = saved[2][2]
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]

    # training on from the restored state is bitwise the same as it was the first time
    _train_a_bit(fresh, fresh_opt, 3)
    for k, v in saved[3][0].items():
        assert torch.equal(fresh.state_dict()[k], v), k

    # the next save clears the leftover temp dir
    ck.save(6, model, opt, {"step": 6})
    assert not (tmp_path / "ck" / ".tmp-step_000004").exists()
    assert (tmp_path / "ck" / "step_000006" / MARKER).is_file()


def test_export_hf_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, opt = _model_and_opt()
    _train_a_bit(model, opt, 0)
    Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(dtype="float32"))
    out = export_hf(tmp_path / "ck" / "step_000001", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 4
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits[0]
        ours = model.logits(model(ids[0], torch.tensor([0, 19], dtype=torch.int32)))
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err


def test_exported_weights_are_as_readable_as_the_other_files(tmp_path):
    # safetensors writes 0600; under a 022 umask the export's config.json is 0644 and its weights must be too
    import os

    model, opt = _model_and_opt()
    Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(dtype="float32"))
    old = os.umask(0o022)
    try:
        out = export_hf(tmp_path / "ck" / "step_000001", tmp_path / "hf")
        model.save_pretrained(tmp_path / "sharded", max_shard_bytes=4096)
    finally:
        os.umask(old)
    for d in (out, tmp_path / "sharded"):
        weights = sorted(d.glob("*.safetensors"))
        assert weights and {f.stat().st_mode & 0o777 for f in weights} == {0o644}, d


def test_export_keeps_the_models_generation_config(tmp_path):
    """The trainer's checkpoint kept the tokenizer but not the source model's generation_config.json, so the
    export had none: transformers / vLLM then stop only on config.json's single eos id (Qwen3's generation config
    adds <|endoftext|>) and drop the model's sampling defaults."""
    from types import SimpleNamespace

    from golong.data.tokenizer import build_demo_tokenizer
    from golong.trainer import Trainer

    src = tmp_path / "src"
    src.mkdir()
    gen = {"eos_token_id": [151645, 151643], "temperature": 0.6, "top_p": 0.95, "do_sample": True}
    (src / "generation_config.json").write_text(json.dumps(gen))
    model, opt = _model_and_opt()
    trainer = SimpleNamespace(tokenizer=build_demo_tokenizer(1024), cfg=SimpleNamespace(model=SimpleNamespace(
        path=str(src))))
    Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(dtype="float32"),
                                       extra_files=lambda d: Trainer._write_tokenizer(trainer, d))
    out = export_hf(tmp_path / "ck" / "step_000001", tmp_path / "hf")
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "generation_config.json").read_text()) == gen


def test_export_logs_its_progress_only_when_slow(tmp_path, monkeypatch, caplog):
    """golong export of a large checkpoint (minutes) printed nothing until done. It reads the checkpoint in parts
    and logs tensors and bytes read, then the shards written, at an interval (PROGRESS_EVERY_S; 0 here), and
    nothing for an export that is over sooner (at the default 30 s). The parts make the same model."""
    import logging

    import golong.checkpoint
    import golong.logger
    from golong.models import from_pretrained

    model, opt = _model_and_opt()
    _train_a_bit(model, opt, 0)
    Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(dtype="float32"))
    ckpt = tmp_path / "ck" / "step_000001"
    log = logging.getLogger("golong")
    log.addHandler(caplog.handler)  # it does not propagate to the root logger
    caplog.set_level(logging.INFO, logger="golong")
    try:
        export_hf(ckpt, tmp_path / "quick")
        assert "export: reading" not in caplog.text and "writing" not in caplog.text
        monkeypatch.setattr(golong.logger, "PROGRESS_EVERY_S", 0.0)
        monkeypatch.setattr(golong.checkpoint, "EXPORT_READ_BYTES", 100_000)  # several parts
        out = export_hf(ckpt, tmp_path / "hf")
    finally:
        log.removeHandler(caplog.handler)
    n = len(model.state_dict())
    reads = [m for m in caplog.messages if m.startswith(f"export: reading {ckpt}: ")]
    assert len(reads) > 2 and reads[-1].startswith(f"export: reading {ckpt}: {n}/{n} tensors, "), reads
    assert reads[-1].endswith(", done")
    assert any(m.startswith(f"writing {out}: 1 shards, ") for m in caplog.messages), caplog.messages
    back = from_pretrained(out, dtype=torch.float32)
    for (name, p), (_, q) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(p, q), name


class _Killed(Exception):
    pass


def test_resaving_a_step_is_atomic(tmp_path, monkeypatch):
    import golong.checkpoint as gc

    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", every=1, keep_last=1)
    ck.save(2, model, opt, {"step": 2, "copy": "old"})
    _train_a_bit(model, opt, 1)

    def kill_at_swap(point: str, step: int) -> None:
        if point == "ckpt_swap":
            raise _Killed  # the process dies with the old copy set aside and the new one sealed

    monkeypatch.setattr(gc, "_fault", kill_at_swap)
    with pytest.raises(_Killed):
        ck.save(2, model, opt, {"step": 2, "copy": "new"})
    assert not (tmp_path / "ck" / "step_000002").exists()  # between the two renames
    monkeypatch.undo()
    path = Checkpointer(tmp_path / "ck", keep_last=1).resolve("auto")  # resume repairs it
    assert path == tmp_path / "ck" / "step_000002"
    fresh, fresh_opt = _model_and_opt(seed=1)
    assert ck.load(path, fresh, fresh_opt)["copy"] == "new"
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_000002"]


def test_newest_means_most_recently_saved(tmp_path):
    model, opt = _model_and_opt()
    old_run = Checkpointer(tmp_path / "ck", keep_last=2)
    for step in (100, 150):
        old_run.save(step, model, opt, {"step": step})
    new_run = Checkpointer(tmp_path / "ck", keep_last=2)  # a run restarted from scratch in the same directory
    new_run.save(50, model, opt, {"step": 50})
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [150, 50]  # its own checkpoint survives pruning
    assert new_run.resolve("auto") == tmp_path / "ck" / "step_000050"


def test_a_damaged_checkpoint_is_one_line_for_resume_eval_and_export(tmp_path, capsys):
    """A sealed checkpoint whose shard file was removed or cut (a copy stopped part way) ended resume, eval and
    export in DCP's CheckpointException, a BaseException no handler sees, with every rank's traceback."""
    from golong.cli import main

    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck")
    path = ck.save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(dtype="float32"))
    shard = next(path.glob("*.distcp"))
    for damage, cause in ((lambda: shard.write_bytes(shard.read_bytes()[:1000]), "EOFError"),
                          (shard.unlink, f"FileNotFoundError: [Errno 2] No such file or directory: '{shard}'")):
        damage()
        message = f"checkpoint {path} is damaged: {cause} (it was complete when written; a file was removed or cut " \
                  "since)"
        for load in (lambda: ck.load(path, *_model_and_opt()), lambda: ck.load(path, _model_and_opt()[0], None),
                     lambda: export_hf(path, tmp_path / "hf")):
            with pytest.raises(ConfigError) as e:
                load()
            assert str(e.value) == message
        assert main(["export", str(path), str(tmp_path / "hf")]) == 2
        assert capsys.readouterr().err.strip() == f"golong: error: {message}"
    # where the run has other checkpoints, the message names the newest and how to resume from it
    ck = Checkpointer(tmp_path / "ck3", keep_last=3)
    _, newer, path = (ck.save(step, *_model_and_opt(), {"step": step}) for step in (10, 20, 30))
    next(path.glob("*.distcp")).unlink()
    with pytest.raises(ConfigError, match=f"damaged: .*; the newest other checkpoint of its run: {newer} "
                                          rf"\(a run resumes from it with checkpoint.resume={newer}, or with the "
                                          r"damaged one moved aside\)$"):
        ck.load(path, *_model_and_opt())


def test_export_refuses_to_replace_anything_but_an_export(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints").save(1, model, opt, {"step": 1},
                                                               hf_config=model.config.to_hf(dtype="float32"))
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    for target in (tmp_path / "run", ckpt):
        before = sorted(p.name for p in target.iterdir())
        with pytest.raises(FileExistsError, match="holds no earlier Hugging Face export"):
            export_hf(ckpt, target)
        assert sorted(p.name for p in target.iterdir()) == before
    out = export_hf(ckpt, tmp_path / "hf")
    (out / "model-00002-of-00002.safetensors").write_text("stale")
    export_hf(ckpt, out)  # an earlier export is replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # the swap failing after the earlier export was set aside (an I/O error, a Ctrl-C): that one is put back
    (out / "model.safetensors").write_bytes(b"the earlier export's weights")
    real_rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".hf.tmp-"):
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    with monkeypatch.context() as m:
        m.setattr(Path, "rename", failing)
        with pytest.raises(OSError, match="Input/output error"):
            export_hf(ckpt, out)
    assert (out / "model.safetensors").read_bytes() == b"the earlier export's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # nothing hidden left beside it
    # a downloaded model holds files no export writes (README, LICENSE): replacing it would delete them
    (out / "README.md").write_text("model card")
    with pytest.raises(FileExistsError, match=r"holds no earlier Hugging Face export \(README.md\)"):
        export_hf(ckpt, out)
    assert (out / "README.md").read_text() == "model card"


def test_export_to_a_directory_it_cannot_create_names_that_directory(tmp_path, capsys):
    """`golong export CKPT /proc/foo` named the temporary directory beside it ('/proc/.foo.tmp-7622')."""
    from golong.cli import main

    model, opt = _model_and_opt()
    ckpt = Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(dtype="float32"))
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file" / "hf", f"File exists ({tmp_path / 'file'})"),
             (tmp_path / "file" / "a" / "hf", f"Not a directory ({tmp_path / 'file' / 'a'})")]
    if Path("/proc/self").is_dir():  # Linux: no directory can be made in /proc
        cases.append((Path("/proc/golong-export"), "No such file or directory"))
    for out, reason in cases:
        assert main(["export", str(ckpt), str(out)]) == 2
        assert capsys.readouterr().err == f"golong: error: cannot create {out}: {reason}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "file"]


def test_export_to_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """Any OSError of writing the export (ENOSPC, a read-only filesystem) is the user's to fix: one line. safetensors
    reports a full disk as its own SafetensorError, no OSError (a traceback); the shards written before it are
    removed (they stayed in a hidden directory, each retry adding another)."""
    import errno

    from safetensors import SafetensorError

    import golong.models.checkpoint
    from golong.cli import main
    from golong.models.checkpoint import save_pretrained

    model, opt = _model_and_opt()
    ckpt = Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(dtype="float32"))
    real_save_file, calls, fits = golong.models.checkpoint.save_file, [], [1]

    def full(*args, **kwargs):  # the first `fits` shards fit, the next fills the disk
        calls.append(args[1])
        if len(calls) <= fits[0]:
            return real_save_file(*args, **kwargs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(golong.models.checkpoint, "save_file", full)
    out = tmp_path / "out"
    with pytest.raises(OSError) as e:
        save_pretrained(model, out / "hf", max_shard_bytes=1024)
    assert e.value.errno == errno.ENOSPC and len(calls) == 2 and list(out.iterdir()) == []
    calls.clear()
    fits[0] = 0
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"golong: error: [Errno 28] No space left on device writing {tmp_path / 'hf'}\n"
    # no hidden shards beside it
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"]


def test_a_checkpoint_write_on_a_full_disk_is_one_line_naming_what_stands(tmp_path, monkeypatch, capsys):
    """DCP and torch.save report a full disk without an errno ("unexpected pos 704 vs 598", "iostream error"): a
    failed write with almost no space left (or an ENOSPC anywhere in the error's chain) is a CheckpointWriteError
    naming the newest complete checkpoint, its partial copy removed (giving the space back); another failure is
    raised as it was. golong train prints it as one line."""
    import errno
    import shutil
    from collections import namedtuple

    import golong.checkpoint as ckpt_module
    from golong.checkpoint import CheckpointWriteError, latest_checkpoint

    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck")
    first = ck.save(1, model, opt, {"step": 1})
    real_save, usage = ckpt_module.torch.save, namedtuple("usage", "total used free")

    def failing(obj, f, *args, **kwargs):  # the trainer state's write
        if str(f).endswith("trainer_state.pt"):
            raise RuntimeError("basic_ios::clear: iostream error")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", failing)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 3 << 20))  # 3 MiB free
    with pytest.raises(CheckpointWriteError) as e:
        ck.save(2, model, opt, {"step": 2})
    assert e.value.errno == errno.ENOSPC and str(e.value) == (
        f"[Errno 28] checkpoint {tmp_path / 'ck' / 'step_000002'}: writing it failed, the disk is full (3 MiB free "
        f"in {tmp_path / 'ck'}); {first} is the newest complete checkpoint (the error: RuntimeError: "
        "basic_ios::clear: iostream error)")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_000001"]  # the partial copy went
    assert latest_checkpoint(tmp_path / "ck") == first
    # plenty of space: not the disk's doing, raised as it was (the partial copy left for the next start's repair)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="^basic_ios::clear: iostream error$"):
        ck.save(2, model, opt, {"step": 2})
    # ... unless the chain says ENOSPC (a filesystem that reserves space: free is not near 0)
    monkeypatch.setattr(ckpt_module.torch, "save", lambda obj, f, *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointWriteError, match="writing it failed, the disk is full"):
        ck.save(2, model, opt, {"step": 2})

    from golong import cli

    def full_run(cfg):
        raise CheckpointWriteError(errno.ENOSPC, "checkpoint X: writing it failed, the disk is full")

    monkeypatch.setattr("golong.trainer.train", full_run)
    assert cli.main(["train", str(Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml")]) == 1
    assert capsys.readouterr().err.endswith("golong: error: [Errno 28] checkpoint X: writing it failed, the disk is "
                                            "full\n")


def _one_rank_fails_its_write(rank: int, world: int, out: str, free_mib: int) -> None:
    import shutil
    from collections import namedtuple

    import golong.checkpoint as ckpt_module
    from golong.checkpoint import CheckpointWriteError

    model, opt = _model_and_opt()
    ck = Checkpointer(Path(out) / "ck")
    ck.save(1, model, opt, {"step": 1})
    real_save = ckpt_module.torch.save
    usage = namedtuple("usage", "total used free")
    shutil.disk_usage = lambda p: usage(10 << 30, 1 << 30, free_mib << 20)  # (a spawned rank: nothing to restore)

    def failing(obj, f, *args, **kwargs):  # rank 1's own rng file, while rank 0 writes on
        if rank == 1 and str(f).endswith("rng_rank1.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4608 vs 4502")
        return real_save(obj, f, *args, **kwargs)

    ckpt_module.torch.save = failing
    try:
        ck.save(2, model, opt, {"step": 2})
        got = "saved"
    except CheckpointWriteError as e:
        got = f"CheckpointWriteError: {e}"
    except RuntimeError as e:
        got = f"RuntimeError: {e}"
    torch.distributed.barrier()
    Path(out, f"rank{rank}.txt").write_text(got)


@pytest.mark.distributed
@pytest.mark.parametrize("free_mib", [3, 4096])
def test_a_checkpoint_write_failing_on_one_rank_fails_every_rank_alike(tmp_path, free_mib):
    """A rank's own file (its RNG state) failing while the others write on: every rank learns it at the next
    barrier (they died at it with gloo's "connection closed" traceback); on a full disk all raise the same
    CheckpointWriteError and rank 0 removes the partial copy, else the failing rank its error, the others one naming
    it as another rank's."""
    from tests.distributed import run_distributed

    run_distributed(_one_rank_fails_its_write, 2, str(tmp_path), free_mib)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if free_mib < 64:
        assert all(s.startswith(f"CheckpointWriteError: [Errno 28] checkpoint {tmp_path / 'ck' / 'step_000002'}: "
                                "writing it failed, the disk is full (3 MiB free") for s in said), said
        assert all("the disk is full" in s and f"{tmp_path / 'ck' / 'step_000001'} is the newest complete" in s
                   for s in said), said
        assert "unexpected pos 4608 vs 4502" in said[1] and said[0].endswith("(on another rank)"), said
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_000001"]
    else:
        assert said == ["RuntimeError: checkpoint " f"{tmp_path / 'ck' / 'step_000002'}: writing it failed on another "
                        "rank (its error is in its log)",
                        "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 4608 vs 4502"]
        assert latest_checkpoint(tmp_path / "ck") == tmp_path / "ck" / "step_000001"


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))


def test_load_refuses_state_files_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", every=1, keep_last=2)
    path = ck.save(1, model, opt, {"step": 1})
    for name in ("trainer_state.pt", "rng_rank0.pt"):
        good = (path / name).read_bytes()
        torch.save({"step": 1, "x": _RunsCodeWhenUnpickled()}, path / name)
        with pytest.raises(ValueError, match=f"{name}: holds more than tensors and plain Python values"):
            ck.load(path, model, opt)
        assert not (tmp_path / "PWNED").exists()
        (path / name).write_bytes(good)
    assert ck.load(path, model, opt)["step"] == 1


def test_should_save_schedule():
    ck = Checkpointer("unused", every=50)
    assert [s for s in range(1, 201) if ck.should_save(s)] == [50, 100, 150, 200]
    assert ck.should_save(73, last_step=True) and not ck.should_save(73)
    never = Checkpointer("unused", every=0)  # every=0: only the final step
    assert not any(never.should_save(s) for s in range(1, 101)) and never.should_save(7, last_step=True)


def test_newest_is_read_from_the_marker_not_the_file_time(tmp_path):
    import os

    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", keep_last=3)
    a = ck.save(10, model, opt, {"step": 10})
    b = ck.save(5, model, opt, {"step": 5})  # sealed later
    later = (a / MARKER).stat().st_mtime_ns + 10**12
    os.utime(a / MARKER, ns=(later, later))  # a copied / touched directory: file times say nothing
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [10, 5]
    # a marker without the seal time (older golong) falls back to the file time
    (a / MARKER).write_text("10\n")
    os.utime(a / MARKER, ns=(later, later))
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [5, 10]
    assert latest_checkpoint(tmp_path / "ck") == a and b.is_dir()


def test_repair_of_every_killed_save_state(tmp_path):
    model, opt = _model_and_opt()
    root = tmp_path / "ck"
    ck = Checkpointer(root, keep_last=5)
    ck.save(1, model, opt, {"step": 1, "copy": "old"})
    ck.save(2, model, opt, {"step": 2, "copy": "old"})
    # step 1 re-saved, killed after its new copy was sealed but before the old one was set aside:
    # the complete checkpoint in place stands, the sealed temp copy is dropped
    (root / ".tmp-step_000001").mkdir()
    (root / ".tmp-step_000001" / MARKER).write_text("1\n5\n")
    # step 2 re-saved, old copy set aside, new copy never sealed: the old copy is put back
    (root / "step_000002").rename(root / ".old-step_000002")
    (root / ".tmp-step_000002").mkdir()
    (root / ".tmp-step_000002" / "__0_0.distcp").write_bytes(b"cut")  # the new copy's shards, part written
    assert ck.resolve("auto") == root / "step_000002"
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002"]
    fresh, fresh_opt = _model_and_opt(seed=1)
    assert ck.load(root / "step_000001", fresh, fresh_opt)["copy"] == "old"
    assert ck.load(root / "step_000002", fresh, fresh_opt)["copy"] == "old"
    # a sealed temp copy beside an unsealed step directory holding leftovers: the sealed one is put in its place
    ck.save(4, model, opt, {"step": 4, "copy": "sealed"})
    (root / "step_000004").rename(root / ".tmp-step_000004")
    (root / "step_000004").mkdir()
    (root / "step_000004" / "__0_0.distcp").write_bytes(b"stale")
    assert ck.resolve("auto") == root / "step_000004"
    assert ck.load(root / "step_000004", fresh, fresh_opt)["copy"] == "sealed"
    assert not (root / ".tmp-step_000004").exists()
    # an explicit resume path must be a sealed checkpoint
    (root / "step_000003").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.resolve(str(root / "step_000003"))
    assert ck.resolve(str(root / "step_000001")) == root / "step_000001"


def test_extra_files_and_export_dtype_and_tokenizer(tmp_path):
    from safetensors import safe_open

    model, opt = _model_and_opt()

    def add_tokenizer(d):
        (d / "tokenizer").mkdir()
        (d / "tokenizer" / "tokenizer.json").write_text('{"fake": true}')

    ckpt = Checkpointer(tmp_path / "ck").save(3, model, opt, {"step": 3}, hf_config=model.config.to_hf(
        dtype="float32"), extra_files=add_tokenizer)
    assert (ckpt / "tokenizer" / "tokenizer.json").read_text() == '{"fake": true}'  # sealed with the checkpoint
    out = export_hf(ckpt, tmp_path / "hf", dtype="bfloat16")
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
        k = next(k for k in keys if k.endswith("q_proj.weight"))
        ref = dict(model.named_parameters())[k].detach()
        assert torch.equal(f.get_tensor(k), ref.to(torch.bfloat16))
    (tmp_path / "ck" / "step_000004").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        export_hf(tmp_path / "ck" / "step_000004", tmp_path / "hf2")


def test_resuming_another_architecture_names_what_differs(tmp_path, caplog):
    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", every=1)
    path = ck.save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(dtype="float32"))
    wide = tiny_config()
    wide.model.scratch.hidden_size *= 2
    other = from_config(scratch_hf_config(wide), dtype=torch.float32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError) as e:  # the CLI's one-line error, not a traceback
        ck.load(path, other, torch.optim.AdamW(other.parameters()))
    msg = str(e.value)
    h = model.config.hidden_size
    assert str(path) in msg and f"embed_tokens.weight is [1024, {h}] there, [1024, {2 * h}] here" in msg
    assert f"hidden_size={h} there, {2 * h} here" in msg and "more)" in msg
    assert "dtype" not in msg  # written with the run's dtype; not an architecture difference
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded

    deeper = tiny_config()
    deeper.model.scratch.num_hidden_layers += 1  # same shapes, one more layer: the extra keys are missing there
    other = from_config(scratch_hf_config(deeper), dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"layers\.\d+\.\S+ missing there.*num_hidden_layers"):
        ck.load(path, other, None)

    # the same shapes, computing otherwise (top-k, RoPE theta, the norms' epsilon, renormalised weights): resumed
    # silently, the run went on as another model
    for key, value in (("num_experts_per_tok", 1), ("rope_theta", 5e5), ("rms_norm_eps", 1e-5),
                       ("norm_topk_prob", False)):
        changed = tiny_config()
        setattr(changed.model.scratch, key, value)
        other = from_config(scratch_hf_config(changed), dtype=torch.float32)
        with pytest.raises(ConfigError, match=rf"holds a different model than the config: its config.json differs "
                                              rf"in {key}=\S+ there, {value!r} here\. Use the model settings"):
            ck.load(path, other, torch.optim.AdamW(other.parameters()))
    # a longer context from here on (YaRN): a warning, and it resumes
    longer = tiny_config()
    longer.model.scratch.max_position_embeddings *= 4
    other = from_config(scratch_hf_config(longer), dtype=torch.float32)
    logging.getLogger("golong").addHandler(caplog.handler)  # it does not propagate to the root logger
    try:
        assert ck.load(path, other, None)["step"] == 1
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)
    assert f"resume: {path} was written with other model settings than the config's, which hold from here on: " \
           "max_position_embeddings=2048 there, 8192 here" in caplog.text
    # golong eval of a checkpoint under other settings on purpose (a longer RoPE theta): warned of, and it loads
    theta = tiny_config()
    theta.model.scratch.rope_theta = 8e6
    other = from_config(scratch_hf_config(theta), dtype=torch.float32)
    caplog.clear()
    logging.getLogger("golong").addHandler(caplog.handler)
    try:
        assert ck.load(path, other, None, resume=False)["step"] == 1
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)
    assert f"eval: {path} was written with other model settings than the config's, which the eval runs with: " \
           "rope_theta=1000000.0 there, 8000000.0 here" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


# ------------------------------------------------------------------- resume on another (dp_shard, cp) layout
def _full_train_state(actor) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(actor.model, actor.optimizer, options=StateDictOptions(full_state_dict=True))
    return {"model": {k: v.clone() for k, v in msd.items()},
            "optim": {fqn: {k: v.clone() for k, v in st.items()} for fqn, st in osd["state"].items()}}


def _layout_save(rank: int, world: int, cp: int, ckpt_dir: str, out: str) -> None:
    from golong.actor import Actor
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import fixed_rollouts

    cfg = tiny_config(parallel__cp=cp, trainer__mini_batch_prompts=3)
    dims = init_parallel(-1, cp, "gloo")
    actor = Actor(build_model(cfg, dims), dims, cfg)
    actor.update(fixed_rollouts(), "pg")  # 2 optimizer steps: Adam moments and step counts to carry over
    Checkpointer(ckpt_dir).save(1, actor.model, actor.optimizer, {"step": 1})
    state = _full_train_state(actor)
    if rank == 0:
        torch.save(state, out)


def _layout_load(rank: int, world: int, cp: int, ckpt_dir: str, saved: str) -> None:
    from golong.actor import Actor
    from golong.build import build_model
    from golong.parallel import init_parallel

    cfg = tiny_config(parallel__cp=cp)
    dims = init_parallel(-1, cp, "gloo")
    actor = Actor(build_model(cfg, dims, seed=99), dims, cfg)  # other weights: the load must replace them all
    actor.optimizer.zero_grad()
    ckpt = Checkpointer(ckpt_dir)
    assert ckpt.load(ckpt.resolve("auto"), actor.model, actor.optimizer)["step"] == 1
    got, want = _full_train_state(actor), torch.load(saved)
    if rank == 0:
        assert sorted(got["model"]) == sorted(want["model"]) and len(want["optim"]) == len(want["model"])
        for k, v in want["model"].items():
            assert torch.equal(got["model"][k], v), k
        for fqn, st in want["optim"].items():
            assert sorted(got["optim"][fqn]) == ["exp_avg", "exp_avg_sq", "step"], fqn
            for k, v in st.items():
                assert torch.equal(got["optim"][fqn][k].cpu(), v.cpu()), (fqn, k)


@pytest.mark.distributed
def test_a_checkpoint_resumes_on_another_parallel_layout(tmp_path):
    """DCP reshards: a checkpoint written by 2 FSDP ranks loads on 1 rank and on a cp=2 ring with the very
    weights and Adam moments / step counts it holds."""
    from tests.distributed import run_distributed

    run_distributed(_layout_save, 2, 1, str(tmp_path / "ckpt"), str(tmp_path / "saved.pt"))
    for world, cp in [(1, 1), (2, 2)]:
        run_distributed(_layout_load, world, cp, str(tmp_path / "ckpt"), str(tmp_path / "saved.pt"))


def test_a_hugging_face_directory_given_as_checkpoint_points_to_model_path(tmp_path):
    from golong.checkpoint import checkpoint_problem

    model, _ = _model_and_opt()
    model.save_pretrained(tmp_path / "hf")
    assert checkpoint_problem(tmp_path / "hf") == (f"{tmp_path / 'hf'} is not a complete checkpoint (no COMPLETE "
                                                   f"marker); it is a Hugging Face model: give it as "
                                                   f"model.path={tmp_path / 'hf'}")
    # an unsealed training checkpoint holds a config.json too, but no safetensors: it is not called a model
    ckpt = Checkpointer(tmp_path / "ck").save(1, model, torch.optim.AdamW(model.parameters()), {"step": 1},
                                              hf_config=model.config.to_hf())
    (ckpt / MARKER).unlink()
    assert checkpoint_problem(ckpt) == f"{ckpt} is not a complete checkpoint (no COMPLETE marker)"


def test_a_dcp_index_that_would_run_code_is_refused_before_dcp_reads_it(tmp_path, monkeypatch):
    """DCP unpickles a checkpoint's `.metadata` as it is: a tampered one ran code on resume, eval and export. golong
    reads it first naming DCP's metadata classes only."""
    import pickle

    from golong.checkpoint import read_metadata

    monkeypatch.chdir(tmp_path)
    model, opt = _model_and_opt()
    path = Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf())
    assert "model.lm_head.weight" in read_metadata(path).state_dict_metadata
    good = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled()))
    for load in (lambda: Checkpointer(tmp_path / "ck").load(path, *_model_and_opt()),
                 lambda: export_hf(path, tmp_path / "hf")):
        with pytest.raises(ConfigError, match=r"\.metadata is not DCP's index \(it names builtins\.exec\); refusing"):
            load()
    assert not (tmp_path / "PWNED").exists()
    (path / ".metadata").write_bytes(good[: len(good) // 2])  # cut: damaged, with the usual message
    with pytest.raises(ConfigError, match=r"is damaged: \.metadata: "):
        Checkpointer(tmp_path / "ck").load(path, *_model_and_opt())
    (path / ".metadata").write_bytes(good)
    assert Checkpointer(tmp_path / "ck").load(path, *_model_and_opt())["step"] == 1


def test_a_checkpoint_before_the_first_update_leaves_the_optimizer_without_state(tmp_path):
    """torch's get_state_dict steps an optimizer without state at lr 0 (Adam's step count 1, zero moments): the
    checkpoint after the SFT warm-up's reset made the first RL update run with step 2's bias correction. Saving and
    loading such a checkpoint now leave the optimizer as it was: the first update is the one without a save."""
    plain, plain_opt = _model_and_opt()
    _train_a_bit(plain, plain_opt, 5)
    model, opt = _model_and_opt()
    path = Checkpointer(tmp_path / "ck").save(0, model, opt, {"step": 0})
    assert not opt.state
    _train_a_bit(model, opt, 5)
    assert all(s["step"] == 1 for s in opt.state.values())
    loaded, loaded_opt = _model_and_opt(seed=3)
    assert Checkpointer(tmp_path / "ck").load(path, loaded, loaded_opt) == {"step": 0}
    assert load_trainer_state(path) == {"step": 0}  # read ahead of the load (resume): the trainer's state only
    assert not loaded_opt.state
    _train_a_bit(loaded, loaded_opt, 5)
    for m in (model, loaded):
        for k, v in plain.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
    # after the first update the state is saved and restored as it is
    path = Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1})
    again, again_opt = _model_and_opt(seed=4)
    Checkpointer(tmp_path / "ck").load(path, again, again_opt)
    assert [s["step"] for s in again_opt.state.values()] == [s["step"] for s in opt.state.values()]


def test_a_node_whose_clock_is_behind_still_seals_the_newest_checkpoint(tmp_path, monkeypatch):
    """"Newest" follows the seal time: a requeued job whose node's clock is a minute behind pruned the checkpoint it
    had just written, and resumed from an older one."""
    import time

    import golong.checkpoint as checkpoint

    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", keep_last=2)
    ck.save(1, model, opt, {"step": 1})
    ck.save(2, model, opt, {"step": 2})
    behind = time.time_ns() - 60 * 10**9
    monkeypatch.setattr(checkpoint.time, "time_ns", lambda: behind)
    path = ck.save(3, model, opt, {"step": 3})
    assert path.is_dir() and [s for s, _ in list_checkpoints(tmp_path / "ck")] == [2, 3]
    assert ck.resolve("auto") == path


def test_a_prune_killed_part_way_leaves_nothing_that_lists_as_complete(tmp_path, monkeypatch):
    """A pruned checkpoint is renamed aside before it is removed: a kill during the removal left a directory
    holding only its COMPLETE marker (removed last), listed as a checkpoint."""
    import shutil

    import golong.checkpoint as checkpoint

    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", keep_last=1)
    ck.save(1, model, opt, {"step": 1})
    real = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name.startswith(".del-") and Path(path).exists():
            for f in sorted(Path(path).iterdir()):
                if f.name != MARKER:
                    f.unlink() if f.is_file() else real(f)
            raise KeyboardInterrupt  # the kill, with the marker left
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, model, opt, {"step": 2})
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [2]
    assert ck.resolve("auto") == tmp_path / "ck" / "step_000002"  # and the leftover goes
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_000002"]


def test_a_cut_state_file_is_a_damaged_checkpoint_naming_the_one_before(tmp_path):
    """trainer_state.pt or an RNG file cut (a power loss before the page cache reached the disk; the files are
    synced now before the marker) ended resume in a bare EOFError / RuntimeError."""
    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", keep_last=2)
    older = ck.save(1, model, opt, {"step": 1})
    path = ck.save(2, model, opt, {"step": 2})
    for name in ("trainer_state.pt", "rng_rank0.pt"):
        good = (path / name).read_bytes()
        for cut in (b"", good[:40]):
            (path / name).write_bytes(cut)
            with pytest.raises(ConfigError, match=rf"checkpoint {path} is damaged: {name}: \w+.*the newest other "
                                                  rf"checkpoint of its run: {older}"):
                ck.load(path, *_model_and_opt())
        (path / name).write_bytes(good)


def test_cuda_rng_state_is_this_devices_own(monkeypatch):
    """The CUDA generator saved and restored is the rank's own device's: restoring every visible device's by index
    failed where the resuming process sees fewer devices (one per rank). An older checkpoint's list gives its
    entry for this device."""
    from golong import checkpoint

    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": got.append(state.tolist()))
    state = checkpoint.rng_state()
    assert state["cuda"].tolist() == [7]
    checkpoint.set_rng_state(state)
    older = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    checkpoint.set_rng_state(dict(state, cuda=older))
    checkpoint.set_rng_state(dict(state, cuda=older[:1]))  # saved on fewer devices than this one's index: left
    assert got == [[7], [1]]


def test_a_resave_killed_while_removing_a_copy_resumes_from_a_whole_one(tmp_path, monkeypatch):
    """Re-saving a step sets the old copy aside (renamed) before anything is removed: a copy removed in place and
    killed part way leaves a directory holding only its COMPLETE marker (removed last), which lists as the
    newest checkpoint and fails to load."""
    import shutil

    import golong.checkpoint as checkpoint

    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", keep_last=2)
    ck.save(2, model, opt, {"step": 2, "copy": "old"})
    _train_a_bit(model, opt, 1)
    real = shutil.rmtree

    def killed(path, *args, **kwargs):
        p = Path(path)
        if p.is_dir() and (p / MARKER).is_file():  # removing a sealed copy: killed with only the marker left
            for f in sorted(p.iterdir()):
                if f.name != MARKER:
                    f.unlink() if f.is_file() else real(f)
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, model, opt, {"step": 2, "copy": "new"})
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    path = ck.resolve("auto")
    assert path == tmp_path / "ck" / "step_000002"
    fresh, fresh_opt = _model_and_opt(seed=1)
    assert ck.load(path, fresh, fresh_opt)["copy"] == "new"
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_keep_last_beyond_the_checkpoints_written_keeps_them_all(tmp_path):
    # fewer checkpoints than keep_last: nothing is pruned (a negative count must not slice from the end)
    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", keep_last=4)
    for step in (1, 2, 3):
        ck.save(step, model, opt, {"step": step})
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [1, 2, 3]
    for step in (4, 5):
        ck.save(step, model, opt, {"step": step})
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [2, 3, 4, 5]


def test_a_copy_beside_a_checkpoint_is_not_one_of_the_runs(tmp_path):
    # a user's backup (step_000002.bak, sealed, written later) must neither be resumed from nor pruned as a step
    import shutil

    model, opt = _model_and_opt()
    ck = Checkpointer(tmp_path / "ck", keep_last=2)
    ck.save(1, model, opt, {"step": 1})
    two = ck.save(2, model, opt, {"step": 2})
    shutil.copytree(two, tmp_path / "ck" / "step_000002.bak")
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [1, 2]
    assert ck.resolve("auto") == two


def test_export_writes_the_dtype_the_checkpoints_config_records(tmp_path):
    # no dtype given: the export keeps the dtype the run recorded in config.json (torch_dtype), not float32
    from safetensors import safe_open

    model, opt = _model_and_opt()
    ckpt = Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1},
                                              hf_config=model.config.to_hf(dtype="bfloat16"))
    out = export_hf(ckpt, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_every_file_of_a_checkpoint_is_synced_before_it_is_sealed(tmp_path, monkeypatch):
    """A checkpoint that comes back cut after a power loss must not carry a marker: every file golong writes
    (the extra files' subdirectories too) is flushed to disk before the marker, DCP's shards by DCP itself."""
    import golong.checkpoint as checkpoint

    synced = []  # (path in the temp directory, whether the marker was there yet)
    real = checkpoint._fsync
    tmp = tmp_path / "ck" / ".tmp-step_000001"

    def recording(path):
        if path.is_relative_to(tmp):
            synced.append((path.relative_to(tmp).as_posix(), (tmp / MARKER).exists()))
        real(path)

    def add_tokenizer(d):
        (d / "tokenizer").mkdir()
        (d / "tokenizer" / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(checkpoint, "_fsync", recording)
    model, opt = _model_and_opt()
    Checkpointer(tmp_path / "ck").save(1, model, opt, {"step": 1}, hf_config=model.config.to_hf(),
                                       extra_files=add_tokenizer)
    before_marker = {name for name, sealed in synced if not sealed}
    assert {"rng_rank0.pt", "trainer_state.pt", "config.json", "tokenizer/tokenizer.json"} <= before_marker
    assert (".", True) in synced  # the directory's entries, marker included, before the rename


def test_numpys_cached_normal_draw_is_restored_with_its_generator():
    # numpy's legacy normals come in pairs, the second cached in the generator's state (has_gauss, cached):
    # a resume that drops it draws other normals than the run it continues
    from golong import checkpoint

    np.random.seed(0)
    np.random.randn()  # an odd number of normals: one cached
    state = checkpoint.rng_state()
    assert state["numpy"][3] == 1
    want = np.random.randn(3)
    np.random.randn(5)
    checkpoint.set_rng_state(state)
    assert np.array_equal(np.random.randn(3), want)
