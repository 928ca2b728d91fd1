"""kernels/tuned.py: per-GPU settings files, their lookup order, validation, and how the kernels apply them."""

import dataclasses
import importlib
import json

import pytest
import torch

from kernels import tuned

CUDA0 = torch.device("cuda", 0)
GPU = "NVIDIA H200"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """An empty built-in directory and a GOLONG_TUNED_DIR, with device 0 named GPU."""
    builtin, run = tmp_path / "builtin", tmp_path / "run"
    builtin.mkdir()
    monkeypatch.setattr(tuned, "DIR", builtin)
    monkeypatch.setenv("GOLONG_TUNED_DIR", str(run))
    monkeypatch.delenv("GOLONG_TUNED", raising=False)
    monkeypatch.setattr(tuned, "gpu_name", lambda index: GPU)
    return builtin, run


def test_file_name_from_the_gpu_name():
    assert tuned.file_name("NVIDIA H200") == "NVIDIA_H200.json"
    assert tuned.file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert tuned.file_name("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100-SXM4-80GB.json"
    assert tuned.file_name("NVIDIA H100 (80GB)") == "NVIDIA_H100_80GB.json"  # no stray underscores at the ends


def test_run_directory_first_then_builtin_per_section(dirs, monkeypatch):
    builtin, run = dirs
    tuned.save("flash_attention", {"split_stages": 2}, {"by": "builtin"}, GPU, builtin)
    tuned.save("grouped_mm", {"FWD_CONFIG": {"num_stages": 4}}, {"by": "builtin"}, GPU, builtin)
    assert tuned.values("flash_attention", CUDA0, ["split_stages"]) == {"split_stages": 2}
    tuned.save("flash_attention", {"split_stages": 1, "q_heavy_first": True}, {"by": "run"}, GPU, run)
    # the run's file wins for the section it has; the other section still comes from the built-in file
    assert tuned.values("flash_attention", CUDA0, ["split_stages", "q_heavy_first"]) == {
        "split_stages": 1, "q_heavy_first": True}
    assert tuned.values("grouped_mm", CUDA0, ["FWD_CONFIG"]) == {"FWD_CONFIG": {"num_stages": 4}}
    assert tuned.values("moe_mlp", CUDA0, ["GATHER_IN_GEMM"]) == {}
    assert tuned.in_use(GPU) == {"flash_attention": {"split_stages": 1, "q_heavy_first": True},
                                 "grouped_mm": {"FWD_CONFIG": {"num_stages": 4}}}
    assert tuned.in_use("NVIDIA A100-SXM4-80GB") == {}
    # CPU tensors and GOLONG_TUNED=0 never see tuned settings
    assert tuned.values("flash_attention", torch.device("cpu"), ["split_stages"]) == {}
    monkeypatch.setenv("GOLONG_TUNED", "0")
    assert tuned.values("flash_attention", CUDA0, ["split_stages"]) == {}
    assert tuned.in_use(GPU) == {}


def test_save_keeps_other_sections_and_records_measurements(dirs):
    _, run = dirs
    tuned.save("moe_mlp", {"GATHER_IN_GEMM": True}, {"gather ms": 1.0}, GPU, run)
    path = tuned.save("grouped_mm", {}, {"candidate": "default"}, GPU, run)
    data = json.loads(path.read_text())
    assert data["moe_mlp"] == {"values": {"GATHER_IN_GEMM": True}, "measured": {"gather ms": 1.0}}
    assert data["grouped_mm"]["values"] == {} and path.name == "NVIDIA_H200.json"
    tuned.save("moe_mlp", {"GATHER_IN_GEMM": False}, {}, GPU, run)  # replaced, re-read after the change
    assert tuned.values("moe_mlp", CUDA0, ["GATHER_IN_GEMM"]) == {"GATHER_IN_GEMM": False}


def test_bad_files_and_unknown_settings_are_named(dirs):
    _, run = dirs
    run.mkdir()
    path = run / "NVIDIA_H200.json"
    path.write_text('{"flash_attention": {"values": {"split_stages": 2,}}}')
    with pytest.raises(ValueError, match=r"NVIDIA_H200.json:1: not valid JSON"):
        tuned.values("flash_attention", CUDA0, ["split_stages"])
    path.write_text('{"flash_attention": {"values": {"split_stagez": 2}}}')
    tuned.reload()  # edited by hand: read again
    with pytest.raises(ValueError, match=r"NVIDIA_H200.json.*\['split_stagez'\]; valid: \['split_stages'\]"):
        tuned.values("flash_attention", CUDA0, ["split_stages"])
    path.write_text('{"flash_attention": [1, 2]}')
    tuned.reload()
    with pytest.raises(ValueError, match="expected"):
        tuned.values("flash_attention", CUDA0, ["split_stages"])
    path.write_text('{"flash_attention": {"values": [["split_stages", 2]]}}')
    tuned.reload()
    with pytest.raises(ValueError, match="expected"):
        tuned.values("flash_attention", CUDA0, ["split_stages"])


def test_pick_needs_a_checked_candidate_faster_than_noise():
    times = {"default": 10.0, "a": 9.8, "b": 9.0, "c": 8.0}
    assert tuned.pick(times, {"a": True, "b": True, "c": False}, "default") == "b"  # c gave wrong results
    assert tuned.pick(times, {"a": True}, "default") == "default"  # 2% is noise
    assert tuned.pick({"default": 10.0}, {}, "default") == "default"
    assert tuned.pick({"default": 10.0, "on": 9.0}, {"on": True, "off": True}, "default") == "on"
    assert tuned.pick({"default": 10.0, "a": 5.0}, {"a": True}, "default", margin=0.5) == "default"  # strictly more
    assert tuned.pick({"default": 10.0, "a": 4.9}, {"a": True}, "default", margin=0.5) == "a"


def test_a_new_run_directory_is_read_and_callers_cannot_edit_the_cache(dirs, tmp_path, monkeypatch):
    _, run = dirs
    tuned.save("moe_mlp", {"GATHER_IN_GEMM": True}, {}, GPU, run)
    assert tuned.values("moe_mlp", CUDA0, ["GATHER_IN_GEMM"]) == {"GATHER_IN_GEMM": True}
    other = tmp_path / "other"
    tuned.save("moe_mlp", {"GATHER_IN_GEMM": False}, {}, GPU, other)
    tuned.values("moe_mlp", CUDA0, ["GATHER_IN_GEMM"])  # cached for the first directory
    monkeypatch.setenv("GOLONG_TUNED_DIR", str(other))  # no reload(): the cache is per directory
    assert tuned.values("moe_mlp", CUDA0, ["GATHER_IN_GEMM"]) == {"GATHER_IN_GEMM": False}
    tuned.lookup("moe_mlp", GPU)[0]["GATHER_IN_GEMM"] = True
    tuned.in_use(GPU)["moe_mlp"]["SWIGLU_IN_GEMM"] = False
    assert tuned.lookup("moe_mlp", GPU)[0] == {"GATHER_IN_GEMM": False}
    assert tuned.in_use(GPU) == {"moe_mlp": {"GATHER_IN_GEMM": False}}


def test_kernels_apply_their_tuned_sections(dirs):
    _, run = dirs
    fa = importlib.import_module("kernels.flash_attention")
    gm = importlib.import_module("kernels.grouped_mm")
    mlp = importlib.import_module("kernels.moe_mlp")
    assert fa.config_for(CUDA0) == fa.CONFIG and fa.config_for(torch.device("cpu")) == fa.INTERPRET_CONFIG
    assert mlp.gather_in_gemm(CUDA0) is False and mlp.swiglu_in_gemm(CUDA0) is True  # the built-in defaults
    tuned.save("flash_attention", {"split_dv_stages": 2, "q_heavy_first": True}, {}, GPU, run)
    tuned.save("grouped_mm", {"DW_CONFIG": {"num_stages": 4}}, {}, GPU, run)
    tuned.save("moe_mlp", {"GATHER_IN_GEMM": True, "SWIGLU_IN_GEMM": False}, {}, GPU, run)
    assert fa.config_for(CUDA0) == dataclasses.replace(fa.CONFIG, split_dv_stages=2, q_heavy_first=True)
    assert fa.config_for(torch.device("cpu")) == fa.INTERPRET_CONFIG
    assert gm._tuned_tiles(CUDA0, "DW_CONFIG", gm.DW_CONFIG) == {"num_stages": 4}
    assert gm._tuned_tiles(CUDA0, "FWD_CONFIG", gm.FWD_CONFIG) == {}
    assert mlp.gather_in_gemm(CUDA0) is True and mlp.gather_in_gemm(torch.device("cpu")) is False
    assert mlp.swiglu_in_gemm(CUDA0) is False and mlp.swiglu_in_gemm(torch.device("cpu")) is True
    tuned.save("grouped_mm", {"DW_CONFIG": {"BLOCK_Q": 64}}, {}, GPU, run)
    with pytest.raises(ValueError, match="BLOCK_Q"):
        gm._tuned_tiles(CUDA0, "DW_CONFIG", gm.DW_CONFIG)
    tuned.save("flash_attention", {"fwd_block_q": 64}, {}, GPU, run)
    with pytest.raises(ValueError, match="fwd_block_q.*valid: .*bwd_split"):
        fa.config_for(CUDA0)
    # what backend="auto" runs, as the attention sweep records it; a value TritonConfig refuses names the file
    tuned.save("flash_attention", {"auto_backend": "varlen_attn"}, {}, GPU, run)
    assert fa.config_for(CUDA0) == dataclasses.replace(fa.CONFIG, auto_backend="varlen_attn")
    tuned.save("flash_attention", {"auto_backend": "fa3"}, {}, GPU, run)
    with pytest.raises(ValueError, match=r"run/NVIDIA_H200.json: \[flash_attention\] auto_backend='fa3': valid"):
        fa.config_for(CUDA0)


def test_committed_gpu_configs_are_valid(tmp_path):
    """Every file in kernels/gpu_configs/ parses and names only settings its modules have. The folder may hold
    no file yet (no sweep committed): the same check then runs on a file in the sweeps' own format, and must
    reject a setting no module has."""
    fa = importlib.import_module("kernels.flash_attention")
    gm = importlib.import_module("kernels.grouped_mm")
    valid = {"flash_attention": {f.name for f in dataclasses.fields(fa.TritonConfig)},
             "grouped_mm": {"FWD_CONFIG", "DW_CONFIG"}, "moe_mlp": {"GATHER_IN_GEMM", "SWIGLU_IN_GEMM"}}
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps({
        "flash_attention": {"values": {"split_dv_stages": 2}, "measured": {}},
        "grouped_mm": {"values": {"FWD_CONFIG": {"TMA": 1, "num_stages": 4}}, "measured": {}},
        "moe_mlp": {"values": {"GATHER_IN_GEMM": True}, "measured": {}}}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grouped_mm": {"values": {"FWD_CONFIG": {"BLOCK_Q": 64}}, "measured": {}}}))
    bad_value = tmp_path / "bad_value.json"
    bad_value.write_text(json.dumps({"flash_attention": {"values": {"auto_backend": "Triton"}, "measured": {}}}))

    def problems(path):
        out = []
        for module, section in json.loads(path.read_text()).items():
            out += [f"{module}.{k}" for k in set(section["values"]) - valid[module]]
            if module == "flash_attention" and not out:
                try:  # the values too: TritonConfig refuses an unknown auto_backend
                    dataclasses.replace(fa.CONFIG, **section["values"])
                except (TypeError, ValueError) as e:
                    out.append(f"{module}: {e}")
            if module == "grouped_mm":
                out += [f"{name}.{k}" for name, over in section["values"].items()
                        for k in set(over) - set(getattr(gm, name))]
        return out

    for path in [*sorted(tuned.DIR.glob("*.json")), sample]:
        assert problems(path) == [], path
    assert problems(bad) == ["FWD_CONFIG.BLOCK_Q"]
    assert problems(bad_value) == ["flash_attention: auto_backend='Triton': valid 'triton', 'varlen_attn'"]
