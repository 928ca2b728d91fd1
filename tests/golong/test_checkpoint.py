"""Training checkpoints: round trip of model / optimizer / RNG / trainer state, atomic sealing,
keep-last-K pruning, resume picking the newest complete one, and the HF export."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from golong.checkpoint import MARKER, Checkpointer, export_hf, latest_checkpoint, list_checkpoints
from golong.models import from_config
from golong.trainer import scratch_hf_config
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


def test_export_refuses_to_replace_anything_but_an_export(tmp_path):
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
